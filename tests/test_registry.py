import pytest

import featurezoo as fz
from featurezoo.registry import register_model


def test_resnet_family_is_registered():
    assert fz.list_models("resnet[0-9]*") == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert set(fz.list_models(module="resnet")) >= {"resnext50_32x4d", "resnext152_64x4d"}
    assert "resnet50" in fz.list_models(features_only=True)
    assert fz.is_model("resnet50") and not fz.is_model("resnet51")


def test_duplicate_registration_is_refused():
    def resnet50():
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet50)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="Unknown model 'resnet05'.*did you mean.*resnet50"):
        fz.create_model("resnet05")


def test_exclude_and_multiple_patterns():
    assert fz.list_models(["resnet18", "resnext50*"]) == ["resnet18", "resnext50_32x4d"]
    assert "resnet18" not in fz.list_models("resnet*", exclude="resnet1*")


def test_pretrained_and_checkpoint_are_exclusive():
    with pytest.raises(ValueError, match="mutually exclusive"):
        fz.create_model("resnet18", pretrained=True, checkpoint_path="x.ckpt")
