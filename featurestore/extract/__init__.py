from featurestore.extract.run import (
    DEFAULT_BATCH_SIZE, DEFAULT_ENCODERS, DecodeWorkerError, ExtractSummary, FeatureSetSummary, StoreLockedError,
    StoreWriteError, add_extract_arguments, classes_argument, encoder_options_argument, extract, main, run_extract,
)
