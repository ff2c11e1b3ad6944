from mergeopt.cli import quiet_foreign_loggers

# Before any test module (or conftest) imports transformers, which imports torchao when it is
# installed: as on the command line, torchao's warnings about its kernels are noise.
quiet_foreign_loggers()
