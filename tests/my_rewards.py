"""A user-supplied reward for the end-to-end test: prefers completions with many letter a's."""


def count_a(prompts, completions):
    return [c.count("a") / max(1, len(c)) for c in completions]
