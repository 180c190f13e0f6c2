"""What a person looks at: the progress lines, PNG/Markdown reports, and optuna-dashboard."""
