"""Headless SCott distillation on diffusers + peft + accelerate."""
