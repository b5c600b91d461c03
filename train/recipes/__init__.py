"""What a run is: the keys a recipe may set (`config`, one typed dataclass per component, and `runs`, a whole run's
config with the checks across components), how a YAML recipe and `key=value` overrides become one (`load`), and the
kinds of run the loop can take (`tasks`: pretraining, contrastive and few-shot fine-tuning)."""
