"""Device words shared by every command that runs a model, kept free of torch (help texts are built
before any model library is imported)."""

#: The ``--device`` help text of every command that runs a model (extract, heads train/predict).
DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"
