//! Training data: formats, chat templating, masking, packing. (in progress)
