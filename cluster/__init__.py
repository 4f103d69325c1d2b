"""kvtier cluster: YAML config, the kvtier CLI, and starting and supervising workers and the router."""
