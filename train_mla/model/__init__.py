"""The MLA model: its config, the attention layer, KV-cache accounting and loading sources."""
