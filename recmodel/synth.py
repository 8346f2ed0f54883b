"""Synthetic catalogue and interaction history with structure a sequence model can learn.

Items belong to latent topics, each with its own vocabulary, so titles, descriptions and tags
carry signal for a text encoder. Popularity is Zipf-like within a topic. Users have a few
favourite topics that drift over the window, and each event tends to follow from the previous
one: with `NEXT_ITEM_PROB` it continues the previous item's "series" (a fixed small set of next
items), with `SAME_TOPIC_PROB` it stays in the previous item's topic, otherwise a topic is drawn
from the user's current tastes. A model over the history therefore beats popularity on a
time-based holdout.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC

import numpy as np
import pandas as pd
import psycopg

from recmodel import db

log = logging.getLogger(__name__)

ITEM_COLUMNS = ("item_id", "title", "description", "tags", "created_at", "active")
INTERACTION_COLUMNS = ("user_id", "item_id", "event_type", "value", "occurred_at", "ingested_at")

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating")
EVENT_TYPE_WEIGHTS = (0.62, 0.18, 0.07, 0.05, 0.08)
NEXT_ITEM_PROB = 0.4  # continue the previous item's series
SAME_TOPIC_PROB = 0.3  # stay within the previous item's topic
NEXT_ITEMS_PER_ITEM = 3
ITEM_ZIPF_EXPONENT = 1.1
TOPIC_ZIPF_EXPONENT = 0.8
LATE_ITEM_SHARE = 0.10  # items created inside the window...
LATE_WINDOW_SHARE = 0.3  # ...within its last 30%
INACTIVE_ITEM_SHARE = 0.02
LATE_JOINER_SHARE = 0.3  # users whose first event is somewhere inside the window
CATALOGUE_AGE_DAYS = 365.0  # early items were created within this long before the window
MAX_INGEST_DELAY_SECONDS = 240.0
APPEND_NEW_ITEM_SHARE = 0.05  # of `items`, added by an append
APPEND_NEW_USER_SHARE = 0.02  # of `users`, added by an append
US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND

COPY_ITEMS = "COPY items (item_id, title, description, tags, created_at, active) FROM STDIN"
COPY_INTERACTIONS = (
    "COPY interactions (user_id, item_id, event_type, value, occurred_at, ingested_at) FROM STDIN"
)
# New events continue after the existing ones. Times no Python datetime holds (infinity, BC, past 9999: rows
# validation quarantines) are left out rather than stop the seed.
SELECT_INTERACTION_STATE = """
SELECT count(*), max(occurred_at) FILTER (WHERE occurred_at BETWEEN '0001-01-01' AND '9999-01-01'),
       max(ingested_at) FILTER (WHERE ingested_at BETWEEN '0001-01-01' AND '9999-01-01')
FROM interactions
"""
# A NULL id (a source whose column allows it) is no user to continue: the validation quarantines such rows.
SELECT_USER_IDS = "SELECT DISTINCT user_id FROM interactions WHERE user_id IS NOT NULL ORDER BY user_id"
SELECT_ITEMS = """
SELECT item_id, title, tags, CASE WHEN created_at BETWEEN '0001-01-01' AND '9999-01-01' THEN created_at END, active
FROM items ORDER BY item_id
"""
LOCK_SOURCE_TABLES = "LOCK TABLE items, interactions IN SHARE ROW EXCLUSIVE MODE"


@dataclass(frozen=True)
class Topic:
    name: str
    form: str
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    kinds: tuple[str, ...]
    themes: tuple[str, ...]
    moods: tuple[str, ...]
    keywords: tuple[str, ...]


def _topic(name: str, form: str, adjectives: str, nouns: str, kinds: str, themes: str, moods: str,
           keywords: str) -> Topic:
    """Words are space-separated, themes `|`-separated (they are phrases)."""
    return Topic(name, form, tuple(adjectives.split()), tuple(nouns.split()), tuple(kinds.split()),
                 tuple(themes.split("|")), tuple(moods.split()), tuple(keywords.split()))


TOPICS: tuple[Topic, ...] = (
    _topic("mystery", "novel", "Midnight Silent Hidden Foggy Crimson Forgotten Locked Quiet",
           "Harbor Manor Alley Lighthouse Cellar Station Library Orchard", "Mystery Case Secret Riddle",
           "a missing heiress|a detective's last case|poisoned tea|a locked room|buried letters|false alibis",
           "suspenseful puzzling atmospheric", "detective whodunit clues investigation sleuth"),
    _topic("romance", "novel", "Sweet Summer Endless Tender Golden Secret Blushing Starlit",
           "Kiss Heart Promise Wedding Vineyard Cottage Letter Dance", "Affair Romance Love Vows",
           "second chances|a summer fling|star-crossed lovers|a fake engagement|"
           "rivals falling in love|a wedding planner",
           "heartwarming tender passionate", "love relationships wedding couple swoon"),
    _topic("science fiction", "film", "Quantum Stellar Orbital Synthetic Distant Binary Cosmic Neon",
           "Colony Android Nebula Starship Frontier Reactor Signal Outpost", "Protocol Odyssey Horizon Paradox",
           "first contact|time travel|a rogue artificial intelligence|colonising Mars|a dying sun|cloned soldiers",
           "cerebral futuristic epic", "space aliens robots future spaceship"),
    _topic("fantasy", "saga", "Enchanted Ancient Shadowed Emerald Runic Dragonborn Elven Cursed",
           "Kingdom Throne Sword Citadel Forest Grimoire Crown Realm", "Chronicles Legend Prophecy Quest",
           "a chosen orphan|dragons waking|a wizard's apprentice|a stolen crown|elven wars|an ancient prophecy",
           "magical sweeping mythic", "magic dragons wizards quest elves"),
    _topic("horror", "film", "Bleeding Hollow Rotting Whispering Haunted Wicked Pale Nameless",
           "Asylum Crypt Doll Basement Graveyard Chapel Woods Attic", "Terror Curse Possession Nightmare",
           "a haunted house|demonic possession|a cursed doll|an abandoned asylum|zombies|a slasher in the woods",
           "terrifying creepy gory", "scary ghosts monsters gore haunted"),
    _topic("comedy", "sitcom", "Awkward Crazy Clumsy Goofy Wacky Cheeky Lazy Silly",
           "Roommates Wedding Roadtrip Office Neighbours Uncle Vacation Party", "Shenanigans Mayhem Disaster Antics",
           "mistaken identity|a disastrous road trip|office pranks|a bachelor party gone wrong|"
           "quirky neighbours|family chaos",
           "hilarious silly witty", "funny humor jokes laughs parody"),
    _topic("thriller", "film", "Deadly Rogue Covert Burning Final Silent Hostile Lethal",
           "Agent Conspiracy Hostage Target Witness Cartel Embassy Dossier", "Protocol Countdown Pursuit Betrayal",
           "a framed spy|a political conspiracy|a ticking bomb|a hostage negotiation|a double agent|a heist gone wrong",
           "tense gripping relentless", "spy action conspiracy chase assassin"),
    _topic("western", "film", "Dusty Lonesome Iron Wild Outlaw Rusty Sunburnt Restless",
           "Saloon Frontier Ranch Canyon Stagecoach Sheriff Prairie Railroad", "Showdown Trail Ballad Bounty",
           "a lone gunslinger|cattle rustlers|a gold rush town|a stagecoach robbery|a frontier sheriff|a revenge ride",
           "gritty rugged sparse", "cowboys gunfights frontier horses outlaws"),
    _topic("history", "documentary", "Imperial Medieval Roman Forgotten Victorian Ancient Royal Revolutionary",
           "Empire Dynasty Pharaoh Crusade Republic Monarch Archive Cathedral", "Chronicle Rise Fall Legacy",
           "the fall of Rome|medieval kings|the industrial revolution|ancient Egypt|the French revolution|lost empires",
           "scholarly detailed sweeping", "historical empires archaeology ancient biography"),
    _topic("cooking", "cookbook", "Rustic Spicy Homemade Crispy Slow Seasonal Savory Sweet",
           "Kitchen Bread Pasta Curry Oven Pantry Grill Bakery", "Recipes Feast Table Kitchen",
           "sourdough baking|weeknight dinners|regional curries|fresh pasta|barbecue techniques|seasonal vegetables",
           "practical delicious cosy", "recipes food baking cuisine chef"),
    _topic("travel", "guide", "Hidden Coastal Northern Wandering Sunlit Island Alpine Tropical",
           "Coast Islands Trails Villages Markets Peaks Rivers Road", "Journeys Escapes Guide Atlas",
           "backpacking Asia|island hopping|mountain treks|road trips along the coast|"
           "street food markets|hidden villages",
           "inspiring vivid adventurous", "tourism destinations backpacking adventure journey"),
    _topic("sports", "documentary", "Unbeaten Golden Final Underdog Legendary Fearless Rising Champion",
           "Season League Stadium Striker Marathon Playoffs Rookie Coach", "Glory Comeback Victory Rivalry",
           "an underdog team|a championship season|a legendary coach|"
           "Olympic training|a bitter rivalry|a rookie's first year",
           "inspiring intense triumphant", "football basketball athletes competition training"),
    _topic("music", "album", "Electric Velvet Acoustic Analog Soulful Midnight Loud Vinyl",
           "Guitar Rhythm Melody Records Stage Chorus Band Jukebox", "Sessions Anthem Tour Ballads",
           "a garage band's rise|jazz improvisation|a legendary tour|making a record|punk rebellion|soulful ballads",
           "energetic soulful melodic", "songs rock jazz concert musicians"),
    _topic("nature", "documentary", "Wild Frozen Deep Untamed Living Silent Vast Blue",
           "Ocean Savanna Reef Glacier Rainforest Wolves Whales Wetlands", "Planet Wilderness Migration Kingdom",
           "whale migrations|predators of the savanna|coral reefs|arctic survival|rainforest canopies|bird courtship",
           "breathtaking serene majestic", "wildlife animals ocean ecology outdoors"),
    _topic("technology", "podcast", "Digital Open Smart Scalable Connected Virtual Cloud Automated",
           "Startup Code Network Algorithm Silicon Platform Database Robot", "Revolution Machine Stack Hackers",
           "building a startup|open source software|machine learning|cybersecurity breaches|"
           "the chip industry|programming craft",
           "insightful technical forward-looking", "programming software startups computers internet"),
    _topic("finance", "guide", "Smart Wealthy Frugal Compound Passive Bullish Steady Balanced",
           "Portfolio Market Budget Dividend Fortune Ledger Investor Savings", "Strategy Playbook Principles Rules",
           "index investing|paying off debt|stock market crashes|retirement planning|"
           "real estate deals|budgeting basics",
           "practical clear disciplined", "money investing stocks budgeting economics"),
    _topic("fitness", "program", "Strong Lean Daily Functional Explosive Mindful Intense Flexible",
           "Workout Core Body Kettlebell Yoga Cardio Muscle Stretch", "Challenge Method Plan Routine",
           "strength training|morning yoga|marathon preparation|high intensity intervals|mobility work|healthy habits",
           "motivating energetic disciplined", "workout exercise health gym yoga"),
    _topic("kids", "cartoon", "Tiny Bouncy Sleepy Happy Brave Curious Giggly Fluffy",
           "Bunny Dinosaur Puppy Robot Train Bear Dragon Penguin", "Adventures Friends Party Playtime",
           "learning to share|a lost teddy bear|counting with friends|"
           "a first day at school|a dinosaur picnic|bedtime stories",
           "playful gentle colourful", "children family animated toddlers learning"),
    _topic("war", "film", "Bloody Last Forgotten Steel Burning Frozen Iron Fallen",
           "Battalion Trench Beachhead Bunker Frontline Squadron Regiment Siege", "Offensive Siege Campaign Stand",
           "a doomed battalion|D-Day landings|a prisoner of war escape|"
           "trench warfare|a submarine patrol|resistance fighters",
           "harrowing brutal heroic", "soldiers battle military combat wwii"),
    _topic("true crime", "podcast", "Cold Unsolved Wicked Notorious Twisted Infamous Dark Missing",
           "Killer Trial Jury Evidence Confession Suspect Verdict Detective", "Files Investigation Case Trial",
           "an unsolved murder|a wrongful conviction|a serial killer|courtroom drama|forensic evidence|a con artist",
           "chilling investigative unsettling", "crime murder courtroom forensics investigation"),
)


@dataclass(frozen=True)
class SyntheticData:
    items: pd.DataFrame  # ITEM_COLUMNS; tags as list[str], created_at tz-aware UTC
    interactions: pd.DataFrame  # INTERACTION_COLUMNS; value NaN unless rating; sorted by occurred_at


@dataclass(frozen=True)
class SeedSummary:
    items_added: int
    events_added: int
    users: int  # distinct users among the added events
    first_event_at: datetime
    last_event_at: datetime
    appended: bool


@dataclass(frozen=True)
class _Catalogue:
    """Every item events may reference (existing ones first, then new ones), as parallel arrays."""

    item_ids: np.ndarray
    topics: np.ndarray
    weights: np.ndarray
    created_us: np.ndarray  # int64 microseconds since epoch; int64 min where unknown


def generate(n_users: int, n_items: int, n_events: int, *, days: float = 90.0, seed: int = 0,
             end: datetime, first_user_id: int = 1, first_item_id: int = 1,
             existing_items: pd.DataFrame | None = None) -> SyntheticData:
    """New items and `n_events` interactions of `n_users` users over the `days` before `end`.

    Without `existing_items`, about `LATE_ITEM_SHARE` of the new items are created late in the
    window and the rest before it. With `existing_items` (a continuation of an existing
    history) events also reference those items, and every new item is created inside the window.
    The same arguments always give identical frames.
    """
    _check_counts(users=n_users, items=n_items, events=n_events)
    if days <= 0:
        raise ValueError(f"days must be > 0, got {days}")
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    rng = np.random.default_rng(seed)
    end_us = _to_us(end)
    start_us = end_us - int(days * US_PER_DAY)
    existing = existing_items if existing_items is not None else pd.DataFrame(columns=list(ITEM_COLUMNS))
    items = _new_items(rng, n_items, start_us, end_us, first_item_id, existing)
    catalogue = _catalogue(rng, existing, items, start_us)
    interactions = _interactions(rng, catalogue, n_users, n_events, start_us, end_us, first_user_id)
    return SyntheticData(items=items, interactions=interactions)


def _check_positive(*, users: int, items: int, events: int) -> None:
    for name, count in (("users", users), ("items", items), ("events", events)):
        if count <= 0:
            raise ValueError(f"{name} must be a positive count, got {count}")


def _check_counts(*, users: int, items: int, events: int) -> None:
    """A fresh history needs at least three events per user; an append samples returning users instead."""
    _check_positive(users=users, items=items, events=events)
    if events < 3 * users:
        raise ValueError(f"events ({events}) must be at least 3 per user (3 * {users} = {3 * users})")


def _to_us(moment: datetime) -> int:
    return pd.Timestamp(moment).tz_convert("UTC").value // 1000  # .value is in nanoseconds


def _timestamps(us: np.ndarray) -> pd.Series:
    return pd.Series(pd.to_datetime(us, unit="us", utc=True))


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    return 1.0 / np.arange(1, n + 1, dtype=float) ** exponent


def _new_items(rng: np.random.Generator, n_items: int, start_us: int, end_us: int, first_item_id: int,
               existing: pd.DataFrame) -> pd.DataFrame:
    topics = rng.integers(len(TOPICS), size=n_items)
    span = end_us - start_us
    if len(existing):
        created = start_us + (rng.random(n_items) * span).astype(np.int64)
    else:
        created = start_us - (rng.random(n_items) * CATALOGUE_AGE_DAYS * US_PER_DAY).astype(np.int64)
        late = rng.choice(n_items, size=round(n_items * LATE_ITEM_SHARE), replace=False)
        late_start = end_us - LATE_WINDOW_SHARE * span
        created[late] = (late_start + rng.random(len(late)) * (end_us - late_start)).astype(np.int64)
    active = np.ones(n_items, dtype=bool)
    active[rng.choice(n_items, size=round(n_items * INACTIVE_ITEM_SHARE), replace=False)] = False
    used_titles = set(existing["title"]) if len(existing) else set()
    titles, descriptions, tags = [], [], []
    for topic_index in topics:
        topic = TOPICS[topic_index]
        title = _unique_title(rng, topic, used_titles)
        titles.append(title)
        descriptions.append(_description(rng, topic, title))
        tags.append([topic.name, *rng.choice(topic.keywords, size=2, replace=False).tolist()])
    return pd.DataFrame({
        "item_id": np.arange(first_item_id, first_item_id + n_items, dtype=np.int64),
        "title": titles,
        "description": descriptions,
        "tags": tags,
        "created_at": _timestamps(created),
        "active": active,
    })


def _unique_title(rng: np.random.Generator, topic: Topic, used: set[str]) -> str:
    """An "Adjective Noun Kind" title; a repeat becomes a sequel ("... II", "... III")."""
    base = f"{rng.choice(topic.adjectives)} {rng.choice(topic.nouns)} {rng.choice(topic.kinds)}"
    title, sequel = base, 1
    while title in used:
        sequel += 1
        title = f"{base} {_roman(sequel)}"
    used.add(title)
    return title


def _roman(number: int) -> str:
    numerals = ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))
    out = ""
    for value, numeral in numerals:
        while number >= value:
            out += numeral
            number -= value
    return out


def _description(rng: np.random.Generator, topic: Topic, title: str) -> str:
    first, second = rng.choice(topic.themes, size=2, replace=False)
    mood = rng.choice(topic.moods)
    article = "an" if mood[0] in "aeiou" else "a"
    return (f"{title} is {article} {mood} {topic.name} {topic.form} about {first} and {second}. "
            f"Fans of {topic.keywords[0]} and {topic.keywords[1]} will feel at home.")


def _catalogue(rng: np.random.Generator, existing: pd.DataFrame, items: pd.DataFrame, start_us: int) -> _Catalogue:
    """Topic, popularity weight and creation time of every item; existing items get a topic from their tags."""
    topic_by_name = {topic.name: index for index, topic in enumerate(TOPICS)}
    existing_topics = np.array([_known_topic(tags, topic_by_name) for tags in existing["tags"]], dtype=np.int64)
    unknown = existing_topics < 0
    existing_topics[unknown] = rng.integers(len(TOPICS), size=int(unknown.sum()))
    new_topics = np.array([topic_by_name[tags[0]] for tags in items["tags"]], dtype=np.int64)
    topics = np.concatenate([existing_topics, new_topics])
    created = pd.concat([pd.to_datetime(existing["created_at"], utc=True), items["created_at"]], ignore_index=True)
    created_us = np.full(len(created), np.iinfo(np.int64).min, dtype=np.int64)
    known = created.notna().to_numpy()
    created_us[known] = created[known].dt.as_unit("us").astype("int64").to_numpy()
    weights = np.zeros(len(topics))
    for topic_index in range(len(TOPICS)):
        members = np.flatnonzero(topics == topic_index)
        order = rng.permutation(members)
        # The topic's most popular item must exist at the window start: it is the fallback for
        # events that drew an item not yet created.
        available = np.flatnonzero(created_us[order] <= start_us)
        if len(available):
            order[[0, available[0]]] = order[[available[0], 0]]
        weights[order] = _zipf_weights(len(order), ITEM_ZIPF_EXPONENT)
    return _Catalogue(item_ids=np.concatenate([existing["item_id"].to_numpy(dtype=np.int64),
                                               items["item_id"].to_numpy(dtype=np.int64)]),
                      topics=topics, weights=weights, created_us=created_us)


def _known_topic(tags: list[str] | None, topic_by_name: dict[str, int]) -> int:
    """The first tag naming a topic (synthetic items carry theirs first), else -1."""
    return next((topic_by_name[tag] for tag in tags or [] if tag in topic_by_name), -1)


@dataclass(frozen=True)
class _Tastes:
    early: list[list[float]]  # per user, cumulative topic weights at the window start
    late: list[list[float]]  # ... and at its end; an event mixes them by its position in the window
    favourite: np.ndarray  # (users, topics) bool: a favourite at either end of the window


def _tastes(rng: np.random.Generator, n_users: int) -> _Tastes:
    """A few favourite topics per user, one of which is swapped for another over the window."""
    n_topics = len(TOPICS)
    popularity = rng.permutation(_zipf_weights(n_topics, TOPIC_ZIPF_EXPONENT))
    popularity /= popularity.sum()
    early, late = [], []
    favourite = np.zeros((n_users, n_topics), dtype=bool)
    for user in range(n_users):
        n_favourites = int(rng.integers(2, 5))
        favourites = rng.choice(n_topics, size=n_favourites + 1, replace=False, p=popularity)
        shares = rng.dirichlet(np.ones(n_favourites)) * 0.85
        start_weights = 0.15 * popularity.copy()
        start_weights[favourites[:-1]] += shares
        end_weights = 0.15 * popularity.copy()
        end_weights[favourites[1:]] += shares  # the first favourite fades, the spare one rises
        early.append(np.cumsum(start_weights).tolist())
        late.append(np.cumsum(end_weights).tolist())
        favourite[user, favourites] = True
    return _Tastes(early=early, late=late, favourite=favourite)


@dataclass(frozen=True)
class _Sampler:
    members: list[list[int]]  # per topic, catalogue indices
    cumulative: list[list[float]]  # per topic, cumulative popularity of `members`
    heads: list[int]  # per topic, its most popular item available at the window start (-1: none)
    global_head: int
    next_items: list[list[int]]  # per catalogue index, its series continuations (same topic)


def _sampler(rng: np.random.Generator, catalogue: _Catalogue, start_us: int) -> _Sampler:
    members, cumulative, heads = [], [], []
    available = catalogue.created_us <= start_us
    if not available.any():
        raise ValueError("no item exists at the start of the window; events could not reference any")
    for topic_index in range(len(TOPICS)):
        topic_members = np.flatnonzero(catalogue.topics == topic_index)
        members.append(topic_members.tolist())
        cumulative.append(np.cumsum(catalogue.weights[topic_members]).tolist())
        ready = topic_members[available[topic_members]]
        heads.append(int(ready[np.argmax(catalogue.weights[ready])]) if len(ready) else -1)
    ready = np.flatnonzero(available)
    next_items = []
    for index, topic_index in enumerate(catalogue.topics):
        others = [m for m in members[topic_index] if m != index] or [index]
        next_items.append(rng.choice(others, size=NEXT_ITEMS_PER_ITEM).tolist())
    return _Sampler(members=members, cumulative=cumulative, heads=heads,
                    global_head=int(ready[np.argmax(catalogue.weights[ready])]), next_items=next_items)


def _events_per_user(rng: np.random.Generator, n_users: int, n_events: int) -> np.ndarray:
    """Heavy-tailed activity with at least three events per user."""
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    return 3 + rng.multinomial(n_events - 3 * n_users, activity / activity.sum())


def _interactions(rng: np.random.Generator, catalogue: _Catalogue, n_users: int, n_events: int, start_us: int,
                  end_us: int, first_user_id: int) -> pd.DataFrame:
    span = end_us - start_us
    users = np.repeat(np.arange(n_users), _events_per_user(rng, n_users, n_events))
    joined = start_us + np.where(rng.random(n_users) < LATE_JOINER_SHARE,
                                 rng.random(n_users) * 0.8 * span, 0.0).astype(np.int64)
    # 1 - random() lies in (0, 1]: every event is strictly after the window start and at most `end`.
    occurred = joined[users] + ((1.0 - rng.random(n_events)) * (end_us - joined[users])).astype(np.int64)
    by_user = np.lexsort((occurred, users))
    users, occurred = users[by_user], occurred[by_user]
    tastes = _tastes(rng, n_users)
    items = _walk(rng, catalogue, _sampler(rng, catalogue, start_us), tastes, users, occurred, start_us, span)
    event_types = rng.choice(len(EVENT_TYPES), size=n_events, p=EVENT_TYPE_WEIGHTS)
    liked = tastes.favourite[users, catalogue.topics[items]]
    ratings = np.clip(np.round((3.0 + liked + rng.normal(0.0, 0.8, n_events)) * 2) / 2, 0.5, 5.0)
    values = np.where(event_types == EVENT_TYPES.index("rating"), ratings, np.nan)
    delays = np.minimum(1.0 + rng.exponential(30.0, n_events), MAX_INGEST_DELAY_SECONDS)
    ingested = np.minimum(occurred + (delays * US_PER_SECOND).astype(np.int64), end_us)
    chronological = np.lexsort((users, occurred))
    return pd.DataFrame({
        "user_id": (users + first_user_id).astype(np.int64)[chronological],
        "item_id": catalogue.item_ids[items][chronological],
        "event_type": np.array(EVENT_TYPES, dtype=object)[event_types][chronological],
        "value": values[chronological],
        "occurred_at": _timestamps(occurred[chronological]),
        "ingested_at": _timestamps(ingested[chronological]),
    })


def _walk(rng: np.random.Generator, catalogue: _Catalogue, sampler: _Sampler, tastes: _Tastes, users: np.ndarray,
          occurred: np.ndarray, start_us: int, span: int) -> np.ndarray:
    """Each user's item sequence (events grouped by user, in time order); returns catalogue indices.

    Plain Python over pre-drawn uniforms: numpy calls per event would dominate the run time.
    """
    draws = rng.random((len(users), 4)).tolist()
    created = catalogue.created_us.tolist()
    topics = catalogue.topics.tolist()
    chosen = [0] * len(users)
    previous, previous_user = -1, -1
    for event, (user, moment) in enumerate(zip(users.tolist(), occurred.tolist())):
        if user != previous_user:
            previous, previous_user = -1, user
        mode, pick, drift, topic_draw = draws[event]
        if previous >= 0 and mode < NEXT_ITEM_PROB:
            item = sampler.next_items[previous][int(pick * NEXT_ITEMS_PER_ITEM)]
        else:
            if previous >= 0 and mode < NEXT_ITEM_PROB + SAME_TOPIC_PROB:
                topic = topics[previous]
            else:
                weights = tastes.late[user] if drift < (moment - start_us) / span else tastes.early[user]
                topic = min(bisect.bisect_right(weights, topic_draw * weights[-1]), len(weights) - 1)
            cumulative = sampler.cumulative[topic]
            if not cumulative:
                topic = topics[sampler.global_head]
                cumulative = sampler.cumulative[topic]
            position = min(bisect.bisect_right(cumulative, pick * cumulative[-1]), len(cumulative) - 1)
            item = sampler.members[topic][position]
        if created[item] > moment:  # not created yet: fall back to a popular item that exists
            head = sampler.heads[topics[item]]
            item = head if head >= 0 else sampler.global_head
        chosen[event] = item
        previous = item
    return np.array(chosen, dtype=np.int64)


def seed_database(url: str, *, users: int, items: int, events: int, seed: int = 0, days: float = 90.0,
                  now: datetime | None = None) -> SeedSummary:
    """Load a synthetic history into an empty database, or append a continuation up to `now`.

    Appending adds `events` events after the newest row (by occurred_at and ingested_at), so an
    incremental extract sees exactly them: existing users continue (plus a few new ones) on
    existing items and on a few new items created in that period. Item series and user tastes of
    the continuation are drawn afresh rather than recovered from the existing history.
    """
    now = now or datetime.now(UTC)
    with db.transaction(url) as conn:
        conn.execute(LOCK_SOURCE_TABLES)
        n_existing, latest_occurred, latest_ingested = conn.execute(SELECT_INTERACTION_STATE).fetchone()
        existing_items = _read_items(conn)
        first_item_id = int(existing_items["item_id"].max()) + 1 if len(existing_items) else 1
        if n_existing == 0:
            _check_counts(users=users, items=items, events=events)
            data = generate(users, items, events, days=days, seed=seed, end=now, first_item_id=first_item_id)
        else:
            _check_positive(users=users, items=items, events=events)
            known = [t for t in (latest_occurred, latest_ingested) if t is not None]
            start = (max(known) if known else now - timedelta(days=days)) + timedelta(seconds=1)
            data = _continuation(conn, users=users, items=items, events=events, seed=seed + n_existing,
                                 start=start, now=now, first_item_id=first_item_id, existing_items=existing_items)
        copy_frames(conn, data.items, data.interactions)
    occurred = data.interactions["occurred_at"]
    summary = SeedSummary(items_added=len(data.items), events_added=len(data.interactions),
                          users=int(data.interactions["user_id"].nunique()),
                          first_event_at=occurred.min().to_pydatetime(), last_event_at=occurred.max().to_pydatetime(),
                          appended=n_existing > 0)
    log.debug("seeded %s: %s", db.redact(url), summary)
    return summary


def _read_items(conn: psycopg.Connection) -> pd.DataFrame:
    rows = conn.execute(SELECT_ITEMS).fetchall()
    frame = pd.DataFrame(rows, columns=["item_id", "title", "tags", "created_at", "active"])
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    return frame


def _continuation(conn: psycopg.Connection, *, users: int, items: int, events: int, seed: int, start: datetime,
                  now: datetime, first_item_id: int, existing_items: pd.DataFrame) -> SyntheticData:
    if start >= now:
        raise ValueError(f"the newest interaction ({start.isoformat()}) is not before now ({now.isoformat()}); "
                         "nothing can be appended")
    known_users = np.array([row[0] for row in conn.execute(SELECT_USER_IDS)], dtype=np.int64)
    n_new_users = max(1, round(users * APPEND_NEW_USER_SHARE))
    n_returning = min(len(known_users), events // 3 - n_new_users)
    rng = np.random.default_rng(seed)
    active_ids = np.concatenate([
        np.sort(rng.choice(known_users, size=n_returning, replace=False)),
        np.arange(known_users.max() + 1, known_users.max() + 1 + n_new_users),
    ])
    data = generate(len(active_ids), max(1, round(items * APPEND_NEW_ITEM_SHARE)), events,
                    days=(now - start).total_seconds() / 86_400, seed=seed, end=now, first_user_id=0,
                    first_item_id=first_item_id, existing_items=existing_items)
    user_ids = active_ids[data.interactions["user_id"].to_numpy()]
    return SyntheticData(items=data.items, interactions=data.interactions.assign(user_id=user_ids))


def copy_frames(conn: psycopg.Connection, items: pd.DataFrame, interactions: pd.DataFrame) -> None:
    """COPY both frames (ITEM_COLUMNS, INTERACTION_COLUMNS) in `conn`'s transaction.

    event_id is left to the bigserial sequence.
    """
    with conn.cursor() as cursor:
        for statement, frame, columns in ((COPY_ITEMS, items, ITEM_COLUMNS),
                                          (COPY_INTERACTIONS, interactions, INTERACTION_COLUMNS)):
            with cursor.copy(statement) as copy:
                for row in zip(*(_python_values(frame[column]) for column in columns)):
                    copy.write_row(row)


def _python_values(column: pd.Series) -> list:
    """Plain Python values for psycopg, with None for NaN/NaT."""
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        return [None if pd.isna(value) else value.to_pydatetime() for value in column]
    return column.astype(object).where(column.notna(), None).tolist()
