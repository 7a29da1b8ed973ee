"""Development tools: tiny offline assets (tokenizer, model, data) and ``make demo``."""
