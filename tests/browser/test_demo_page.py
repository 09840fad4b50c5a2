"""The demo page (``service/static/``) driven in a real Chromium against a real server process.

Each test has its users in browser contexts of their own (separate storage: two people on two
machines) on one server and one browser shared by the module, and rooms of its own. Every wait
is Playwright's ``expect`` with a timeout: a state the page must reach, never time passing.
Screenshots go to ``tests/browser/artifacts/`` (git-ignored; ``CHAT_TEST_ARTIFACTS`` moves them).

Skipped where Playwright for Python or Chromium is missing: ``.ci/run`` installs Debian's
``chromium`` when it runs as root and pyproject's ``test`` extra brings ``playwright`` (its own
browser downloads are never used: ``CHAT_TEST_CHROMIUM``, by default ``/usr/bin/chromium``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.db.migrate import upgrade
from tests.support import ServerProcess, make_token

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
)
CHROMIUM = Path(os.environ.get("CHAT_TEST_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHAT_TEST_CHROMIUM)",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, BrowserContext, Page, expect  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

TIMEOUT_MS = 10_000
"""The longest any state may take to show: every ``expect`` and every action waits this long."""
ROOMS_POLL_BOUND_MS = 7_000
"""A room someone else started shows in the list within this (the page polls every 3 s)."""
WIDE = {"width": 1600, "height": 1000}
PHONE = {"width": 390, "height": 844}
ARTIFACTS = Path(os.environ.get("CHAT_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


@pytest.fixture(scope="module")
def page_server(
    fresh_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server of the module's own: the room list shows every public room of its database."""
    url = fresh_database()
    upgrade(url)
    log_path = tmp_path_factory.mktemp("browser") / "server.log"
    env = {
        # Presence changes show within a fraction of a second (defaults: 1 s, and 5 s of grace).
        "CHAT_PRESENCE_INTERVAL": "0.2",
        "CHAT_PRESENCE_GRACE": "0.5",
        # Typing ends with a message, never by expiry here: a slow step cannot make it go.
        "CHAT_TYPING_TIMEOUT": "60",
    }
    with ServerProcess(url, log_path=log_path, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def browser(page_server: ServerProcess) -> Iterator[Browser]:
    """Playwright's sync API runs an event loop in this thread until the module ends: what
    needs ``asyncio.run`` (a database for the server) is made before it starts."""
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Person:
    """One user at one browser: a context of their own (cookies, localStorage) and a page."""

    def __init__(
        self,
        context: BrowserContext,
        shots: Path,
        errors: list[str] | None = None,
        alerts: list[str] | None = None,
    ) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.shots = shots
        self.errors: list[str] = [] if errors is None else errors
        self.alerts: list[str] = [] if alerts is None else alerts
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", self._dialog)

    def tab(self) -> Person:
        """Another tab of the same browser: the same localStorage, a sessionStorage of its own."""
        return Person(self.context, self.shots, self.errors, self.alerts)

    def _dialog(self, dialog: Any) -> None:
        """A delete asks to confirm: yes. Anything else (an alert) is recorded, and a failure."""
        if dialog.type == "confirm":
            dialog.accept()
        else:
            self.alerts.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

    def shot(self, name: str, *, full_page: bool = False) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def login(self, user: str) -> None:
        """The dev login a newcomer uses: a name, then "Get dev token"."""
        self.page.goto("/")
        self.page.fill("#user", user)
        self.page.get_by_role("button", name="Get dev token").click()
        expect(self.page.locator("#who-name")).to_have_text(f"signed in as {user}")

    def login_with_token(self, token: str) -> None:
        """What a user of an identity provider does: paste its token."""
        self.page.goto("/")
        self.page.locator("#paste-box summary").click()
        self.page.fill("#token-input", token)
        self.page.get_by_role("button", name="Use token").click()
        expect(self.page.locator("#chat-view")).to_be_visible()

    def open_room(self, room: str) -> None:
        self.page.fill("#room", room)
        self.page.locator("#room-form").get_by_role("button", name="Open").click()
        self.expect_live(room)

    def expect_live(self, room: str) -> None:
        expect(self.page.locator("#status")).to_have_attribute("data-state", "live")
        expect(self.page.locator("#status-text")).to_have_text(f"live in #{room}")

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")
        expect(self.page.locator("#input")).to_have_value("")

    @property
    def bodies(self) -> Any:
        """The texts of the messages shown (confirmed ones), in page order."""
        return self.page.locator("#messages li.msg .body")

    def message(self, text: str) -> Any:
        """The message whose text contains ``text``, pinned by its seq: it stays found when
        its text changes (an open editor, an edit, a delete)."""
        shown = self.page.locator("#messages li.msg", has=self.page.locator(".body", has_text=text))
        expect(shown).to_have_count(1)
        seq = shown.get_attribute("data-seq")
        return self.page.locator(f'#messages li.msg[data-seq="{seq}"]')

    def unread(self, room: str) -> Any:
        """A room's unread badge as it looks ("3", "3 · @1"; its screen-reader text aside)."""
        return self.chip(room).locator('.badge.unread [aria-hidden="true"]')

    def chip(self, room: str) -> Any:
        return self.page.locator(f'#rooms .chip[data-room="{room}"]')

    def close(self) -> None:
        self.context.close()


People = Callable[..., Person]
"""``people(**context_options)``: the ``people`` fixture."""


@pytest.fixture
def people(
    browser: Browser, page_server: ServerProcess, request: pytest.FixtureRequest
) -> Iterator[People]:
    """``people(**context_options)``: a new user at a new browser. At the end, none of their
    pages may have thrown an error or shown an alert."""
    shots = ARTIFACTS / request.node.name
    made: list[Person] = []

    def make(**options: Any) -> Person:
        options.setdefault("viewport", WIDE)
        context = browser.new_context(base_url=page_server.http, **options)
        context.set_default_timeout(TIMEOUT_MS)
        person = Person(context, shots)
        made.append(person)
        return person

    yield make
    for person in made:
        person.close()
    for person in made:
        assert person.errors == [], f"errors in the page: {person.errors}"
        assert person.alerts == [], f"dialogs in the page: {person.alerts}"


def new_room(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def assert_fits_its_text(page: Page, selector: str = "#input") -> None:
    """The message box is at least a line tall and shows all of its text or placeholder.

    The page measures the box again after a layout change (a resize observer, called before the
    next frame): wait a moment for that, then report the sizes it settled on.
    """
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(
            "s => { const e = document.querySelector(s);"
            " return e.style.height !== '0px' && e.scrollHeight <= e.clientHeight; }",
            arg=selector,
            timeout=2_000,
        )
    size = page.eval_on_selector(
        selector,
        "e => ({client: e.clientHeight, scroll: e.scrollHeight, style: e.style.height,"
        " line: parseFloat(getComputedStyle(e).lineHeight)})",
    )
    assert size["style"] != "0px", size
    assert size["client"] >= size["line"], f"collapsed: {size}"
    assert size["scroll"] <= size["client"], f"text or placeholder cut off: {size}"


STICKING_OUT = """() => {
  const out = [];
  const shown = 'button, input, select, textarea, summary, label, .chip, .badge, h2, p, li';
  for (const el of document.querySelectorAll(shown)) {
    const r = el.getBoundingClientRect();
    if (!r.width || !el.checkVisibility()) continue;
    const box = el.closest('.card, .log, .composer, .topbar')?.getBoundingClientRect()
      ?? { left: 0, right: innerWidth };
    if (r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.right > innerWidth + 0.5) {
      const what = `${el.tagName}#${el.id}.${el.className}`;
      out.push(`${what}: ${r.left}-${r.right} in ${box.left}-${box.right}`);
    }
  }
  const { scrollWidth, clientWidth } = document.documentElement;
  if (scrollWidth > clientWidth) out.push(`page: ${scrollWidth} > ${clientWidth}`);
  return out;
}"""


def assert_nothing_sticks_out(page: Page) -> None:
    """No control or text reaches past its card or the window, and nothing scrolls sideways."""
    assert page.evaluate(STICKING_OUT) == []


def test_two_users_chat_both_ways_in_order_and_see_history_after_reload(people: People) -> None:
    room = new_room("chat")
    alice, bob = people(), people()
    alice.login("alice")
    # Bug (a): on a wide window the box was collapsed to a sliver after login.
    assert_fits_its_text(alice.page)
    alice.open_room(room)
    bob.login("bob")
    bob.open_room(room)

    alice.send("hello bob")
    expect(bob.bodies).to_have_text(["hello bob"])
    bob.send("hi alice")
    alice.send("how are you?")
    bob.send("fine, thanks")
    conversation = ["hello bob", "hi alice", "how are you?", "fine, thanks"]
    expect(alice.bodies).to_have_text(conversation)
    expect(bob.bodies).to_have_text(conversation)
    # Own messages on one side, the other's on the other.
    expect(alice.page.locator("#messages li.msg.own .body")).to_have_text(conversation[0::2])
    expect(bob.page.locator("#messages li.msg.own .body")).to_have_text(conversation[1::2])
    alice.shot("alice-chat")
    # A draft of one line on a wide window wraps onto several once the window narrows.
    alice.page.fill("#input", "a draft that is long enough to wrap on a phone " * 3)
    assert_fits_its_text(alice.page)
    alice.page.set_viewport_size(PHONE)
    assert_fits_its_text(alice.page)
    alice.page.set_viewport_size(WIDE)
    alice.page.fill("#input", "")

    # Bug (b): after a reload the page reopens the room it remembers, with its history.
    alice.page.reload()
    alice.expect_live(room)
    expect(alice.bodies).to_have_text(conversation)
    assert_fits_its_text(alice.page)
    # ... and after logging out and in again.
    alice.page.get_by_role("button", name="Log out").click()
    expect(alice.page.locator("#login-view")).to_be_visible()
    alice.login("alice")
    alice.expect_live(room)
    expect(alice.bodies).to_have_text(conversation)
    bob.send("welcome back")
    expect(alice.bodies).to_have_text([*conversation, "welcome back"])
    alice.shot("alice-after-login")


def test_a_second_tab_is_someone_else(people: People) -> None:
    """The README's way to try it: a second tab, as someone else."""
    room = new_room("tabs")
    alice = people()
    alice.login("alice")
    alice.open_room(room)
    alice.send("from the first tab")

    bob = alice.tab()
    bob.page.goto("/")
    expect(bob.page.locator("#login-view")).to_be_visible()
    bob.login("bob")
    bob.open_room(room)
    bob.send("from the second tab")
    both = ["from the first tab", "from the second tab"]
    expect(alice.bodies).to_have_text(both)
    expect(alice.page.locator("#messages li.msg.own .body")).to_have_text(both[:1])

    alice.page.reload()  # each tab stays who it was, in its room
    alice.expect_live(room)
    expect(alice.page.locator("#who-name")).to_have_text("signed in as alice")
    expect(alice.page.locator("#messages li.msg.own .body")).to_have_text(both[:1])
    # A third tab: alice logs in again and is back in her room.
    third = alice.tab()
    third.login("alice")
    third.expect_live(room)
    expect(third.bodies).to_have_text(both)


def test_offline_and_back_shows_what_was_sent_meanwhile_once(people: People) -> None:
    room = new_room("offline")
    alice, bob = people(), people()
    alice.login("alice")
    alice.open_room(room)
    bob.login("bob")
    bob.open_room(room)
    alice.send("before")
    expect(bob.bodies).to_have_text(["before"])

    # The network goes: the page drops its socket at once and waits to be back online.
    alice.context.set_offline(True)
    expect(alice.page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    expect(alice.page.locator("#status-text")).to_contain_text("offline")
    for text in ("while you were away 1", "while you were away 2", "while you were away 3"):
        bob.send(text)
    alice.send("written offline")
    expect(alice.page.locator("#pending li .state")).to_have_text(["queued"])
    alice.shot("alice-offline")

    alice.context.set_offline(False)
    alice.expect_live(room)
    everything = [
        "before",
        "while you were away 1",
        "while you were away 2",
        "while you were away 3",
        "written offline",
    ]
    expect(alice.bodies).to_have_text(everything)
    expect(bob.bodies).to_have_text(everything)
    expect(alice.page.locator("#pending li")).to_have_count(0)
    # What failed while offline ("network error") is not left on screen.
    expect(alice.page.locator("#room-panel-error")).to_be_empty()

    # The socket stopped by the page ("Simulate drop") resumes the same way.
    alice.page.get_by_role("button", name="Simulate drop").click()
    bob.send("after the drop")
    alice.expect_live(room)
    expect(alice.bodies).to_have_text([*everything, "after the drop"])
    expect(alice.page.locator("#messages .note.ok")).to_have_text(["reconnected", "reconnected"])
    alice.shot("alice-back-online")


def test_html_in_a_message_is_shown_as_text_and_runs_nothing(people: People) -> None:
    room = new_room("html")
    alice, bob = people(), people()
    alice.login("alice")
    alice.open_room(room)
    bob.login("bob")
    bob.open_room(room)
    hostile = [
        '<img src=x onerror="window.injected=1;alert(1)">',
        "<script>window.injected=2</script><b>bold?</b>",
        '<a href="javascript:alert(3)">click</a> @alice',
    ]
    for text in hostile:
        bob.send(text)
    expect(alice.bodies).to_have_text(hostile)
    # A reply quotes it: text too.
    alice.message(hostile[0]).get_by_role("button", name="Reply to bob").click()
    expect(alice.page.locator("#reply-quote")).to_have_text(hostile[0])
    alice.send("that is not a picture")
    expect(bob.page.locator("#messages li.msg .quote .quote-text")).to_have_text([hostile[0]])

    alice.page.reload()  # history renders through the same path
    alice.expect_live(room)
    expect(alice.bodies).to_have_text([*hostile, "that is not a picture"])
    for person in (alice, bob):
        page = person.page
        expect(
            page.locator("#messages img, #messages script, #messages a, #messages b")
        ).to_have_count(0)
        assert page.evaluate("window.injected") is None
    # A mention of oneself is highlighted: still as text.
    expect(alice.page.locator("#messages mark.mention")).to_have_text(["@alice"])
    alice.shot("alice-html-as-text")


def test_private_room_is_for_its_members_only(people: People) -> None:
    room = new_room("secret")
    alice, bob, carol = people(), people(), people()
    bob.login("bob")
    alice.login("alice")
    alice.page.locator("#create-box summary").click()
    alice.page.fill("#new-name", room)
    alice.page.select_option("#new-kind", "private")
    alice.page.fill("#new-title", "<i>Secret</i> plans")
    alice.page.fill("#new-members", "bob")
    alice.page.get_by_role("button", name="Create room").click()
    alice.expect_live(room)
    expect(alice.page.locator("#room-kind")).to_have_text("private")
    expect(alice.page.locator("#room-role")).to_have_text("owner")
    expect(alice.page.locator("#room-title")).to_have_text("<i>Secret</i> plans")
    alice.send("the plan is ready")

    # Bob, a member, sees it come into his list without reloading (bug c) and reads it.
    expect(bob.chip(room)).to_contain_text("<i>Secret</i> plans", timeout=ROOMS_POLL_BOUND_MS)
    bob.chip(room).click()
    bob.expect_live(room)
    expect(bob.bodies).to_have_text(["the plan is ready"])

    # Carol is no member: the room is not in her list and opening it by name shows nothing.
    carol.login("carol")
    expect(carol.page.locator("#rooms")).not_to_contain_text("Secret")
    carol.page.fill("#room", room)
    carol.page.locator("#room-form").get_by_role("button", name="Open").click()
    expect(carol.page.locator("#status")).to_have_attribute("data-state", "error")
    expect(carol.page.locator("#room-hint")).to_contain_text("No such room visible to you")
    expect(carol.page.locator("#room-join")).to_be_hidden()
    expect(carol.bodies).to_have_count(0)
    alice.send("still secret")
    expect(bob.bodies).to_have_text(["the plan is ready", "still secret"])
    expect(carol.bodies).to_have_count(0)
    carol.shot("carol-refused")
    alice.shot("alice-private-room")

    # Its owner deletes it: its members lose it at once, and a reload does not try it again.
    alice.page.get_by_role("button", name="Delete room").click()  # confirmed
    expect(bob.page.locator("#messages .note.error")).to_have_text(
        ["You no longer have access to this room"]
    )
    expect(bob.chip(room)).to_have_count(0)
    bob.page.reload()
    expect(bob.page.locator("#chat-view")).to_be_visible()
    expect(bob.page.locator("#status")).to_have_attribute("data-state", "idle")
    expect(bob.page.locator("#room-panel")).to_be_hidden()


def test_edits_deletes_and_reactions_show_on_both_sides(people: People) -> None:
    room = new_room("edits")
    alice, bob = people(), people()
    alice.login("alice")
    alice.open_room(room)
    bob.login("bob")
    bob.open_room(room)
    alice.send("teh first draft")
    alice.send("a mistake")
    expect(bob.bodies).to_have_text(["teh first draft", "a mistake"])

    mine = alice.message("teh first draft")
    mine.get_by_role("button", name="edit", exact=True).click()
    editor = mine.locator(".editor textarea")
    editor.fill("the first draft")
    editor.press("Enter")
    expect(bob.bodies).to_have_text(["the first draft", "a mistake"])
    expect(bob.message("the first draft").locator(".edited")).to_have_text("(edited)")
    # Bob may not edit it.
    expect(bob.message("the first draft").get_by_role("button", name="edit")).to_have_count(0)

    theirs = bob.message("the first draft")
    theirs.locator("button.reaction.add").click()  # "+": its title says "add a reaction"
    theirs.get_by_role("button", name="👍").click()
    expect(theirs.locator("button.reaction.me")).to_have_text("👍 1")
    expect(alice.message("the first draft").locator("button.reaction")).to_have_text(["👍 1", "+"])
    alice.message("the first draft").get_by_role("button", name="👍 1").click()
    expect(bob.message("the first draft").locator("button.reaction")).to_have_text(["👍 2", "+"])

    alice.message("a mistake").get_by_role("button", name="delete", exact=True).click()
    expect(bob.page.locator("#messages li.msg.deleted .body")).to_have_text(["message deleted"])
    expect(bob.bodies).to_have_text(["the first draft", "message deleted"])
    bob.shot("bob-edits-reactions")


def test_unread_badges_come_and_go_in_a_direct_chat(people: People) -> None:
    here = new_room("here")
    dora, emil = people(), people()  # these two only: their direct room is the test's own
    dora.login("dora")
    dora.open_room(here)
    dora.send("anyone?")
    emil.login("emil")
    emil.page.locator("#create-box summary").click()
    emil.page.fill("#direct-user", "dora")
    emil.page.get_by_role("button", name="Direct chat").click()
    direct = "dm.dora.emil"  # the server's name for the pair
    emil.expect_live(direct)
    expect(emil.page.locator("#room-title")).to_have_text("@dora")
    # The emptied form does not show its required field as invalid.
    expect(emil.page.locator("#direct-user:user-invalid")).to_have_count(0)
    emil.send("news for you")
    emil.send("@dora look")

    # Bug (c): the room list refreshes by itself, with the unread and mention counts.
    expect(dora.unread(direct)).to_have_text("2 · @1", timeout=ROOMS_POLL_BOUND_MS)
    expect(dora.chip(direct)).to_contain_text("@emil")
    expect(dora.chip(direct).locator(".badge.unread")).to_have_class("badge unread mentioned")
    dora.shot("dora-unread-badge")

    dora.chip(direct).click()
    dora.expect_live(direct)
    expect(dora.bodies).to_have_text(["news for you", "@dora look"])
    expect(dora.page.locator("#read-marker")).to_have_text("new messages")
    expect(dora.chip(direct).locator(".badge.unread")).to_have_count(0)
    # Read: the badge stays away once dora is elsewhere (the server has her cursor).
    dora.chip(here).click()
    dora.expect_live(here)
    emil.send("one more")
    expect(dora.unread(direct)).to_have_text("1", timeout=ROOMS_POLL_BOUND_MS)


def test_presence_typing_and_display_names(people: People) -> None:
    room = new_room("team")
    alice, bob, carol = people(), people(), people()
    alice.login("alice")
    alice.page.locator("#create-box summary").click()
    alice.page.fill("#new-name", room)
    alice.page.select_option("#new-kind", "private")
    alice.page.fill("#new-members", "bob, carol")
    alice.page.get_by_role("button", name="Create room").click()
    alice.expect_live(room)
    expect(alice.page.locator("#presence-text")).to_have_text("only you here")

    # Bug (d): the token's display name is shown, to its bearer and to the others.
    carol.login_with_token(make_token("carol", name="Carol Lewis"))
    expect(carol.page.locator("#who-name")).to_have_text("signed in as Carol Lewis (carol)")
    carol.open_room(room)
    bob.login("bob")
    bob.open_room(room)
    expect(alice.page.locator("#presence-text")).to_have_text("3 here: bob, Carol Lewis, you")
    expect(carol.page.locator("#presence-text")).to_have_text("3 here: alice, bob, you")

    # Member dots: who of the members is here.
    alice.page.locator("#members-box summary").click()
    members = alice.page.locator("#members li")
    expect(members).to_have_count(3)
    for user in ("bob", "carol"):
        expect(members.filter(has_text=user).locator(".presence-dot")).to_have_class("presence-dot")

    carol.page.fill("#input", "let me think")
    expect(alice.page.locator("#typing")).to_have_text("Carol Lewis is typing…")
    bob.page.fill("#input", "me too")
    expect(alice.page.locator("#typing")).to_have_text("bob and Carol Lewis are typing…")
    alice.shot("alice-presence-typing")
    assert_nothing_sticks_out(alice.page)  # a wide window, every form open
    carol.page.press("#input", "Enter")
    expect(alice.page.locator("#typing")).to_have_text("bob is typing…")
    expect(alice.bodies).to_have_text(["let me think"])

    carol.close()
    expect(alice.page.locator("#presence-text")).to_have_text("2 here: bob, you")
    expect(members.filter(has_text="carol").locator(".presence-dot")).to_have_class(
        "presence-dot away"
    )
    alice.shot("alice-carol-gone")


def test_phone_width_is_usable(people: People) -> None:
    room = new_room("phone")
    phone = people(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    other = people()
    phone.page.goto("/")
    expect(phone.page.locator("#login-view")).to_be_visible()
    phone.page.locator("#paste-box summary").click()
    assert_nothing_sticks_out(phone.page)  # the login button stuck out of its card
    phone.shot("phone-login")
    phone.login("alice")
    assert_fits_its_text(phone.page)
    phone.open_room(room)
    other.login("bob")
    other.open_room(room)
    other.send("a long line from the desktop: " + "words " * 40)
    expect(phone.bodies).to_have_count(1)

    page = phone.page
    page.locator("#input").tap()
    page.fill("#input", "from my phone")
    page.locator("#send").tap()
    expect(other.bodies.last).to_have_text("from my phone")
    assert_fits_its_text(page)
    # The room the first message created shows as one; bob's typing ended with his message.
    expect(page.locator("#room-kind")).to_have_text("public")
    expect(page.locator("#typing")).to_be_empty()
    # The room's details pushed the log down: its newest message is still in full view.
    log, newest = page.locator("#log").bounding_box(), page.locator("#messages li.msg").last
    expect(newest).to_be_in_viewport(ratio=1)
    box = newest.bounding_box()
    assert log and box and box["y"] + box["height"] <= log["y"] + log["height"], (box, log)

    width = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
    assert width[0] <= width[1], f"horizontal scroll: {width}"
    for selector in ("#input", "#send", "#room", "#status"):
        box = page.locator(selector).bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (selector, box)
        assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], (selector, box)
    phone.shot("phone")
    phone.shot("phone-full", full_page=True)

    # The box grows with a long text, up to a limit, and never past the screen's width.
    page.fill("#input", "line\n" * 30)
    grown = page.locator("#input").bounding_box()
    assert grown is not None and 60 < grown["height"] <= 0.41 * PHONE["height"], grown
    page.fill("#input", "")

    # An owner's room has the most controls (the member form stuck out, the page scrolled
    # sideways): all of them fit, with the forms open.
    owned = new_room("mine")
    page.locator("#create-box summary").click()
    page.fill("#new-name", owned)
    page.select_option("#new-kind", "private")
    page.fill("#new-members", "bob")
    page.get_by_role("button", name="Create room").click()
    phone.expect_live(owned)
    expect(page.locator("#room-role")).to_have_text("owner")
    page.locator("#create-box summary").click()
    page.locator("#members-box summary").click()
    expect(page.locator("#members li")).to_have_count(2)
    assert_nothing_sticks_out(page)
    phone.send("room of my own")
    expect(page.locator("#messages li.msg").last).to_be_in_viewport(ratio=1)
    phone.shot("phone-owner", full_page=True)


def test_favicon_is_served(page_server: ServerProcess, browser: Browser) -> None:
    context = browser.new_context(base_url=page_server.http)
    try:
        icon = context.request.get("/favicon.ico")
        assert icon.status == 200
        assert icon.headers["content-type"] == "image/vnd.microsoft.icon"
        assert icon.body()[:4] == b"\x00\x00\x01\x00"  # an ICO
        page = context.new_page()
        page.goto("/")
        for link in page.locator("link[rel=icon]").all():
            href = link.get_attribute("href")
            assert href and context.request.get(href).status == 200, href
    finally:
        context.close()
