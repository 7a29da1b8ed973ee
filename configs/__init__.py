"""Shipped apex_finetune configs, installed as the package data of apex_tune._configs."""
