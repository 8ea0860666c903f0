"""glue-vlm: zero-shot classification of astronomical images with vision-language models.

Importing the package is cheap: engines import torch, transformers or openai only when
they are created, and nothing here imports glue or Qt.
"""

__version__ = "0.1.0"
