"""patternlake: personalized pattern discovery on the lakehouse."""

__version__ = "0.1.0"
