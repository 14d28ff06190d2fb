"""Shipped YAML recipes; `finetune recipes` lists them."""
