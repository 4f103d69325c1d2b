"""kvtier workers: the model, attention, the engine (scheduler, runner, sampler)."""
