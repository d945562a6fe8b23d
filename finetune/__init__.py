"""Policy fine-tuning for constrained alignment: SafeDPO and MoCAN (`alignserve finetune`)."""
