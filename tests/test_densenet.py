"""DenseNet's dense block: the no-autograd path (one preallocated buffer) computes the concatenations."""
import torch

from featurezoo.models.densenet import _DenseBlock


def test_dense_block_buffer_equals_concatenation():
    torch.manual_seed(0)
    block = _DenseBlock(num_layers=3, num_input_features=5, bn_size=2, growth_rate=4, drop_rate=0.0).eval()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 5, 6, 6)
    expected = x
    for layer in block.cell_list:  # the definition, written out
        expected = torch.cat((expected, layer(expected)), dim=1)
    with torch.inference_mode():
        out = block(x)
    assert out.shape == (2, 5 + 3 * 4, 6, 6)
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(out[:, :5], x)  # the input is copied, not overwritten
