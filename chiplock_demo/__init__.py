"""Examples that ship beside chiplock: the demo (``chiplock demo``), offline datasets, small training loops and the
example models (a small CNN, ResNet-18/50, the pretrained DigitCNN).

chiplock itself installs with crypto + torch + safetensors only; this package's third-party dependencies
(matplotlib, scikit-learn, mlxtend) are the ``demo`` extra: ``pip install 'chiplock[demo]'``. The models and
training loops need only torch.
"""

from chiplock._extras import require

__all__ = ["require"]
