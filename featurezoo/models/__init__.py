"""The model zoo: importing a family module registers its models."""
from . import resnet  # noqa: F401
from . import convnext  # noqa: F401
from . import resnest  # noqa: F401
from . import mobilenetv2  # noqa: F401
from . import mobilenetv3  # noqa: F401
from . import efficientnet  # noqa: F401
from . import hrnet  # noqa: F401
from . import repvgg  # noqa: F401
from . import rexnet  # noqa: F401
