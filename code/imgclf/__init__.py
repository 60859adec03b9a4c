"""Train and serve image classifiers on Amazon SageMaker with bring-your-own containers."""

__version__ = "0.1.0"
