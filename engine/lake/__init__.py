"""The Parquet lake analysts query, its writer (journal segments -> lake, detection fed on
the way), and the review trail."""
