"""Training prompts for a draft head: the given sets plus generated prompts of the same kinds as the benchmarks.

Generated kinds: arithmetic word problems, coding tasks and everyday instructions from templates, questions about
the standard library's documentation topics (`pydoc_data.topics`), and requests that ask the target to write a
question about a topic itself (`topic_requests`; `questions_from_replies` turns its replies into prompts). All of it
is deterministic from a seed, and none of it comes from the held-out sets (GSM8K, MBPP, Alpaca): `build_prompts`
drops any prompt whose text is one of theirs, so evaluation on them stays honest.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from radar.common.prompts import Prompt, load_prompts

HELD_OUT = ("gsm8k", "mbpp", "alpaca")
KINDS = ("arithmetic", "coding", "instructions", "pydoc")

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Viktor", "Wen", "Yara", "Zoe")
ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "coins", "shells", "cards",
         "plants", "cupcakes", "postcards", "beads", "tickets", "oranges", "notebooks", "candles")
PLACES = ("bakery", "library", "farm", "garden shop", "bookstore", "school fair", "market", "toy store")
TOPICS = (
    "black holes", "photosynthesis", "the French Revolution", "compound interest", "volcanoes", "sourdough bread",
    "the immune system", "machine learning", "the Roman Empire", "climate change", "sleep", "the stock market",
    "electric cars", "honeybees", "the Renaissance", "vaccines", "plate tectonics", "jazz music", "meditation",
    "the internet", "DNA", "coffee", "the Moon landing", "renewable energy", "ancient Egypt", "chess", "rainbows",
    "inflation", "marathon training", "the printing press", "octopuses", "quantum computing", "public speaking",
    "gardening", "the water cycle", "cryptography", "the Silk Road", "nutrition", "earthquakes", "origami",
    "solar panels", "the human brain", "recycling", "Shakespeare", "budgeting", "glaciers", "3D printing",
    "the Olympic Games", "antibiotics", "bird migration", "databases", "the Great Wall of China", "yoga",
    "time zones", "coral reefs", "electric circuits", "impressionist painting", "job interviews", "tea",
    "the periodic table", "volunteering", "rockets", "language learning", "dinosaurs", "cloud computing",
    "the Amazon rainforest", "photography", "probability", "the Cold War", "composting", "hurricanes",
    "open source software", "mushrooms", "the Industrial Revolution", "sign language", "submarines", "friendship",
)
CODING_TASKS = (
    ("reverse_words", "reverses the order of the words in a sentence"),
    ("is_palindrome", "checks whether a string reads the same forwards and backwards, ignoring case and spaces"),
    ("count_vowels", "counts the vowels in a string"),
    ("flatten", "flattens a nested list of any depth"),
    ("merge_sorted", "merges two sorted lists into one sorted list"),
    ("chunk", "splits a list into chunks of size n"),
    ("word_frequencies", "returns a dictionary of word counts for a text"),
    ("fizzbuzz", "returns the FizzBuzz sequence up to n as a list of strings"),
    ("second_largest", "returns the second largest distinct number in a list"),
    ("rotate_list", "rotates a list to the right by k positions"),
    ("is_prime", "checks whether an integer is prime"),
    ("gcd", "computes the greatest common divisor of two integers with Euclid's algorithm"),
    ("binary_search", "finds the index of a value in a sorted list with binary search"),
    ("transpose", "transposes a matrix given as a list of lists"),
    ("dedupe", "removes duplicates from a list while keeping the original order"),
    ("caesar", "encrypts a string with a Caesar cipher and a given shift"),
    ("running_mean", "returns the running mean of a list of numbers"),
    ("parse_csv_line", "parses one line of comma-separated values, honouring double quotes"),
    ("snake_to_camel", "converts a snake_case identifier to camelCase"),
    ("balanced", "checks whether the brackets in a string are balanced"),
    ("digits_sum", "returns the sum of the digits of a non-negative integer"),
    ("anagrams", "groups a list of words into lists of anagrams"),
    ("matrix_multiply", "multiplies two matrices given as lists of lists"),
    ("roman", "converts an integer between 1 and 3999 to a Roman numeral"),
    ("longest_common_prefix", "returns the longest common prefix of a list of strings"),
    ("top_k", "returns the k most common elements of a list"),
    ("celsius_table", "prints a table of Celsius and Fahrenheit temperatures from 0 to 100 in steps of 10"),
    ("validate_email", "checks whether a string looks like an email address using a regular expression"),
    ("moving_window_max", "returns the maximum of every window of size k in a list"),
    ("bubble_sort", "sorts a list with bubble sort and returns it"),
    ("read_json_keys", "reads a JSON file and returns its top-level keys"),
    ("retry", "calls a function up to n times until it stops raising an exception"),
    ("lru_cache_demo", "memoizes a recursive Fibonacci function with functools.lru_cache"),
    ("count_lines", "counts the non-empty lines of a text file"),
    ("interleave", "interleaves the elements of two lists"),
    ("histogram", "prints a text histogram of a list of integers using asterisks"),
)
CODING_FORMS = (
    "Write a Python function `{name}` that {task}.",
    "Write a Python function `{name}` that {task}. Include a docstring and one example.",
    "Implement `{name}` in Python: it {task}. Explain how it works briefly.",
    "Write a Python function that {task}, then show how to call it.",
    "Write a JavaScript function `{camel}` that {task}.",
)
INSTRUCTION_FORMS = (
    "Give three tips for {goal}.", "Write a short poem about {topic}.", "Explain {topic} to a ten-year-old.",
    "Write a short story that involves {topic}.", "List five interesting facts about {topic}.",
    "Summarize what people should know about {topic} in one paragraph.", "What are the pros and cons of {goal}?",
    "Write a friendly email inviting a colleague to a talk about {topic}.", "Describe a day spent {goal}.",
    "Compare {topic} and {other} in a few sentences.", "Write a product description for a book about {topic}.",
    "Give a step-by-step plan for {goal}.", "Write a tweet about {topic}.", "Explain why {topic} matters.",
)
GOALS = ("saving money", "learning to cook", "staying focused at work", "running a first 5k", "keeping a plant alive",
         "learning a new language", "moving to a new city", "starting a small business", "studying for an exam",
         "planning a road trip", "sleeping better", "writing a resume", "making new friends", "reducing waste",
         "learning to code", "hosting a dinner party", "training a puppy", "reading more books")
PYDOC_FORMS = (
    "Explain the Python topic '{title}' with a short example.",
    "What should a Python programmer know about {title}? Give an example.",
    "Here is part of the Python documentation:\n\n{excerpt}\n\nExplain it in simple terms.",
    "Summarize this excerpt of the Python reference:\n\n{excerpt}",
)
TOPIC_REQUEST = ("Write one question that a curious person might ask about {topic}. Reply with the question only, "
                 "nothing else.")


def arithmetic_problem(rng: random.Random) -> str:
    """One generated word problem (two or three steps of whole-number arithmetic)."""
    name, friend = rng.sample(NAMES, 2)
    item, place = rng.choice(ITEMS), rng.choice(PLACES)
    a, b, c = rng.randint(5, 60), rng.randint(2, 30), rng.randint(1, 9)
    price, weeks = rng.randint(2, 15), rng.randint(2, 8)
    forms = (
        (f"{name} has {a} {item}. {name} buys {b} more at the {place} and gives {c} to {friend}. "
         f"How many {item} does {name} have now?"),
        (f"At the {place}, {item} cost ${price} each. {name} buys {b} of them and pays with a ${price * b + a} bill. "
         f"How much change does {name} get?"),
        f"{name} collects {c} {item} every day for {weeks} weeks. How many {item} does {name} collect in total?",
        f"{name} and {friend} share {a * c} {item} equally among {c} friends. How many {item} does each friend get?",
        f"{name} earns ${a} a week and spends ${min(b, a - 1)} of it. How much does {name} save in {weeks} weeks?",
        (f"A {place} sold {a} {item} on Monday and {b} more on Tuesday than on Monday. How many {item} did it sell "
         f"on the two days together?"),
        (f"{name} reads {b} pages a day. The book has {b * weeks * 7 + c} pages. How many pages are left after "
         f"{weeks} weeks?"),
        f"{friend} has {c} times as many {item} as {name}, who has {b}. How many {item} do they have together?",
    )
    return rng.choice(forms) + rng.choice(("", " Explain your reasoning step by step.", " Show your work."))


def coding_task(rng: random.Random) -> str:
    """One coding request from the templates."""
    name, task = rng.choice(CODING_TASKS)
    camel = re.sub(r"_(\w)", lambda m: m.group(1).upper(), name)
    return rng.choice(CODING_FORMS).format(name=name, task=task, camel=camel)


def instruction(rng: random.Random) -> str:
    """One everyday instruction (writing, explaining, advice) from the templates."""
    topic, other = rng.sample(TOPICS, 2)
    return rng.choice(INSTRUCTION_FORMS).format(topic=topic, other=other, goal=rng.choice(GOALS))


def pydoc_question(rng: random.Random) -> str:
    """One question about a topic of the standard library's documentation (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    key = rng.choice(sorted(topics))
    text = topics[key].strip()
    start = rng.randrange(0, max(1, len(text) - 600))
    excerpt = text[start : start + rng.randint(250, 600)].strip()
    title = key.replace("-", " ")
    return rng.choice(PYDOC_FORMS).format(title=title, excerpt=excerpt)


MAKERS = {"arithmetic": arithmetic_problem, "coding": coding_task, "instructions": instruction, "pydoc": pydoc_question}


def generated_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` distinct prompts from the templates, the kinds taking turns; the same for the same seed."""
    rng = random.Random(seed)
    out: list[Prompt] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n and attempts < 50 * n + 100:
        kind = KINDS[attempts % len(KINDS)]
        attempts += 1
        text = MAKERS[kind](rng)
        if text not in seen:
            seen.add(text)
            out.append(Prompt(id=f"{kind}-{len(out)}", text=text, source=f"generated:{kind}"))
    return out


def topic_requests(n: int, seed: int = 0) -> list[Prompt]:
    """`n` requests asking the target to write a question about a topic (its replies become prompts)."""
    rng = random.Random(seed + 1)
    topics = [TOPICS[i % len(TOPICS)] for i in range(n)]
    rng.shuffle(topics)
    return [Prompt(id=f"topic-request-{i}", text=TOPIC_REQUEST.format(topic=t), source="generated:topic-request")
            for i, t in enumerate(topics)]


def questions_from_replies(replies: Sequence[tuple[str, str]]) -> list[Prompt]:
    """Prompts from the target's replies to `topic_requests` ((request id, reply) pairs): the first line, kept when
    it reads as a question."""
    out, seen = [], set()
    for rid, reply in replies:
        line = reply.strip().splitlines()[0].strip().strip('"') if reply.strip() else ""
        if 10 <= len(line) <= 300 and line.endswith("?") and line not in seen:
            seen.add(line)
            out.append(Prompt(id=rid.replace("topic-request", "topic"), text=line, source="generated:topic"))
    return out


def held_out_texts() -> set[str]:
    """Every prompt text of the held-out sets, whitespace-normalised."""
    return {normalise(p.text) for name in HELD_OUT for p in load_prompts(name)}


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def build_prompts(specs: Sequence[str], generated: int, seed: int = 0) -> list[Prompt]:
    """The given prompt sets (names or jsonl paths) plus `generated` template prompts, without any held-out prompt
    and without repeats."""
    banned = held_out_texts()
    given = [p for spec in specs for p in load_prompts(spec)]
    out, seen = [], set()
    for p in given + generated_prompts(generated, seed):
        key = normalise(p.text)
        if key not in banned and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def drop_held_out(prompts: Sequence[Prompt]) -> list[Prompt]:
    """`prompts` without those whose text is a held-out prompt (for prompts the target wrote itself)."""
    banned = held_out_texts()
    return [p for p in prompts if normalise(p.text) not in banned]
