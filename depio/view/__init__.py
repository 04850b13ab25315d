"""What a person sees: the terminal view (table, live view, summary) and the per-task log folders."""
