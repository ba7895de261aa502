"""Cloud guide: torch backprop guidance, replay aggregation, the guide daemon. Never imports llama_cpp."""
