"""Built-in tasks: ``gsm`` (grade-school math) and ``sentiment`` (VADER human-rated sentences)."""
