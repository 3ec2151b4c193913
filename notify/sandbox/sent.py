"""What the sandbox's providers accepted: the messages their search APIs answer from, and the
count of repeated sends of one delivery (the duplicates a person would receive).

Both are bounded: the oldest messages are forgotten first, so a long run's memory stays flat."""

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

# Messages kept for search and duplicate counting, per provider, by default (about 1.2 KB
# each): a repeat of one of the newest 100,000 sends is counted; a million-message benchmark
# keeps the sandbox within a few hundred MB. --store-size raises it.
STORE_SIZE = 100_000


def _digest(*parts: str) -> bytes:
    """A short fixed-size key: a million of them stay tens of megabytes."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).digest()


@dataclass
class ProviderMessages:
    """One provider's accepted messages, indexed the ways its search API filters them."""

    size: int = STORE_SIZE
    messages: deque[dict[str, Any]] = field(default_factory=deque)
    by_index: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    # The duplicate key of each delivery sent -> the collapse key of its latest send ("": none).
    sent: OrderedDict[bytes, str] = field(default_factory=OrderedDict)
    duplicates: int = 0
    visible_duplicates: int = 0

    def add(self, *, message: dict[str, Any], indexes: dict[str, str]) -> None:
        """Keep an accepted message for search, findable by each (index name, value) given."""
        message["_indexes"] = indexes
        self.messages.append(message)
        for name, value in indexes.items():
            self.by_index.setdefault(name, {}).setdefault(value, []).append(message)
        if len(self.messages) > self.size:
            oldest = self.messages.popleft()
            for name, value in oldest["_indexes"].items():
                bucket = self.by_index[name][value]
                # The oldest is first in its buckets too; a bucket holds one delivery's or one
                # address's messages, a few, so lists (a deque's block is larger than most).
                bucket.pop(0)
                if not bucket:
                    del self.by_index[name][value]

    def found(self, *, index: str, value: str) -> list[dict[str, Any]]:
        return self.by_index.get(index, {}).get(value, [])

    def count_send(self, *, identity: tuple[str, ...], collapse_key: str = "") -> bool:
        """Count one send of the message `identity` names; True when it repeats an earlier
        one. The repeat is visible unless both carry the same collapse key."""
        key = _digest(*identity)
        earlier = self.sent.get(key)
        if earlier is None and len(self.sent) >= self.size:
            self.sent.popitem(last=False)
        self.sent[key] = collapse_key
        if earlier is None:
            return False
        self.duplicates += 1
        if not collapse_key or collapse_key != earlier:
            self.visible_duplicates += 1
        return True


@dataclass
class Sent:
    size: int = STORE_SIZE
    providers: dict[str, ProviderMessages] = field(default_factory=dict)

    def of(self, provider: str) -> ProviderMessages:
        if provider not in self.providers:
            self.providers[provider] = ProviderMessages(size=self.size)
        return self.providers[provider]

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            "duplicates": {name: p.duplicates for name, p in self.providers.items()},
            "visible_duplicates": {name: p.visible_duplicates for name, p in self.providers.items()},
        }
