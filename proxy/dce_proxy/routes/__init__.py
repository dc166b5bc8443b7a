"""HTTP routes, one blueprint per audience: health probes, OpenAI clients, the DCE extension."""
