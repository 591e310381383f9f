"""Attribution methods: one spec each, plain functions ``(model, x, target=None, **options) -> Tensor``."""
