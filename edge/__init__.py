"""Edge: zeroth-order adapter training through llama.cpp. Never imports torch."""
