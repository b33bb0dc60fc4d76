"""The exact mode: the real model's reference step on fake tensors (`exact`), one depth (`step`), the depth line
(`depth`), the cold-start fork (`fork`), the fake-tensor patches (`patches`) and the live-bytes tracker (`tracker`,
which imports torch; the others import it inside functions)."""
