"""The core: hooks (the only place that registers them), the guard that runs a model without changing
it, targets, and the shared forward+backward passes every gradient method reads from."""
