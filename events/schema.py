"""Names and codes shared by every stage: behaviour types and the Taobao column layout."""

BEHAVIORS: tuple[str, ...] = ("pv", "cart", "fav", "buy")
"""Behaviour names in code order; code 0 is kept for padding, so ``pv`` is 1."""

BEHAVIOR_CODE: dict[str, int] = {name: i + 1 for i, name in enumerate(BEHAVIORS)}
NUM_BEHAVIOR_CODES = len(BEHAVIORS) + 1

TAOBAO_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
