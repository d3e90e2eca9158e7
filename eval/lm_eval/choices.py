"""Answer choices for the MGSM loglikelihood tasks (lm-eval `process_docs`)."""

CHOICES = 4


def with_choices(dataset):
    """Each row's answer among the next distinct answers of the column (cyclically), the gold
    at position row mod 4. Distractors are real MGSM answers, as round and as long as gold
    ones, so a scorer that ignores the question gets 25%; rows are the same problems in every
    language, so every language gets the same choices."""
    answers = dataset["answer"]

    def add_choices(doc, row):
        others = []
        for step in range(1, len(answers)):
            candidate = answers[(row + step) % len(answers)]
            if candidate != doc["answer"] and candidate not in others:
                others.append(candidate)
            if len(others) == CHOICES - 1:
                break
        gold = row % CHOICES
        others.insert(gold, doc["answer"])
        return {"choices": [str(answer) for answer in others], "gold": gold}

    return dataset.map(add_choices, with_indices=True)
