"""The inference engine: scheduler, block manager, model runner and the LLM facade."""
