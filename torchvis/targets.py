"""What to explain when the model's output is not ``[B, classes]``: ready-made score functions for
``target=``.

``target`` may be a callable ``f(output) -> Tensor[B]`` that turns the model's raw output (a tensor, a
dict, a tuple, a list) into one score per example; every method explains that score. These build the
common ones::

    from torchvis.targets import class_in_region, output_tensor
    # a torchvision segmentation model returns {"out": [B, classes, H, W]}
    score = output_tensor("out", class_in_region(15, mask))  # class 15's logits summed inside mask
    torchvis.saliency(seg_model, image, score)

See :mod:`torchvis.core.targets` for everything ``target`` takes (class indices, tuple indices into a
larger output ``[B, d1, ..., dk]``, callables).
"""

from torchvis.core.targets import ScoreFunction, Target, class_in_region, class_logit, output_tensor

__all__ = ["ScoreFunction", "Target", "class_in_region", "class_logit", "output_tensor"]
