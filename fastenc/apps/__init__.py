"""fastenc applications built on the library: kernel inspector, fine-tuning, pretraining."""
