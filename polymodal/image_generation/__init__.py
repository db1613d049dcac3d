"""Images out (issue 17): an image tokenizer, the LLM's image-code tokens, and a flow head."""
