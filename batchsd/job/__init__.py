"""The job processor: manifest -> validated rows -> batches -> images + results.parquet, resumable."""
