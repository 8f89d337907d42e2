"""The `make demo` walk-through: tiny local models, a live teacher service, a DeepSpeed student."""
