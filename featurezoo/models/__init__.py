"""The model zoo: importing a family module registers its models."""
from . import resnet  # noqa: F401
