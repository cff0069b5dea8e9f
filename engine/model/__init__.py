"""The Llama-family model with paged attention, and its loader."""
