"""rafale: an opinionated transformer training CLI on MosaicML Composer."""

__version__ = "0.1.0"
