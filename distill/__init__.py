"""distill: build BK-SDM backbones by block removal and knowledge distillation."""
