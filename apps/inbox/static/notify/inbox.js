/*
 * Notify inbox widget: <notify-inbox>, a custom element with a bell, an unread badge in the
 * colour of the highest unread severity, tabs, and the recipient's in-app notifications,
 * updated live over WebSocket. One script tag, no build step, no dependencies, so it works
 * the same in any framework (or none).
 *
 *   <script src="https://notify.example.com/static/notify/inbox.js"></script>
 *   <notify-inbox api-url="https://notify.example.com" token="<recipient token>"></notify-inbox>
 *   <script>
 *     // Your server's endpoint that asks POST /api/v1/inbox-tokens for the signed-in person.
 *     document.querySelector("notify-inbox").getToken = async () => (await fetch("/inbox-token")).text();
 *   </script>
 *
 * Attributes: api-url, token, locale (else the recipient's, else the page's), theme ("light"
 * or "dark"; else the system's), tabs (JSON, see docs/inbox.md), snooze-minutes (60).
 * Events (bubbling, composed): notify-inbox-item (a new item arrived; detail.item),
 * notify-inbox-counts (detail.counts), notify-inbox-open (an item was opened; cancelable:
 * preventDefault() keeps the widget from following its link).
 *
 * The WebSocket connects first and sends the token as its first message (never in the URL,
 * which servers and proxies log); the list is then read from the inbox API, and the socket
 * adds what arrives. On reconnect the widget sends the newest item it holds and the server
 * sends what it missed. Items are kept by id, so an item that arrives twice is shown once.
 * The server closes the socket when the token expires; the widget then asks getToken for a
 * fresh one and reconnects. Without getToken, live updates stop when the token expires.
 */
(function () {
  "use strict";

  const CLOSE_TOKEN_INVALID = 4001;
  const CLOSE_TOKEN_EXPIRED = 4002;
  const CLOSE_TOO_MANY_SOCKETS = 4029;
  const MAX_RETRY_DELAY = 30000;
  const TAB_COUNTS_DELAY = 250;

  // A small table rather than Intl messages: the browser has no translations of our strings.
  const STRINGS = {
    en: {
      title: "Notifications", bell: "Notifications, {n} unread", readAll: "Mark all read",
      archiveRead: "Archive read", empty: "Nothing yet.", all: "All", unread: "Unread", archived: "Archived",
      snooze: "Snooze", snoozeLabel: "Snooze “{title}”", newItem: "New notification: {title}", grouped: "{n} new",
      more: "{n} more", preferences: "Notification settings", unavailable: "Notifications are unavailable.",
      signIn: "Sign in again to see new notifications.",
      paused: "Live updates are paused: this inbox is open in too many windows.",
    },
    fr: {
      title: "Notifications", bell: "Notifications, {n} non lues", readAll: "Tout marquer comme lu",
      archiveRead: "Archiver les lues", empty: "Rien pour l’instant.", all: "Toutes", unread: "Non lues",
      archived: "Archivées", snooze: "Plus tard", snoozeLabel: "Reporter « {title} »",
      newItem: "Nouvelle notification : {title}", grouped: "{n} nouvelles", more: "{n} de plus",
      preferences: "Préférences de notification", unavailable: "Les notifications sont indisponibles.",
      signIn: "Reconnectez-vous pour voir les nouvelles notifications.",
      paused: "Mises à jour en direct suspendues : cette boîte est ouverte dans trop de fenêtres.",
    },
    de: {
      title: "Benachrichtigungen", bell: "Benachrichtigungen, {n} ungelesen", readAll: "Alle als gelesen markieren",
      archiveRead: "Gelesene archivieren", empty: "Noch nichts.", all: "Alle", unread: "Ungelesen",
      archived: "Archiviert", snooze: "Später", snoozeLabel: "„{title}“ zurückstellen",
      newItem: "Neue Benachrichtigung: {title}", grouped: "{n} neue", more: "{n} weitere",
      preferences: "Benachrichtigungseinstellungen", unavailable: "Benachrichtigungen sind nicht verfügbar.",
      signIn: "Melden Sie sich erneut an, um neue Benachrichtigungen zu sehen.",
      paused: "Live-Updates pausiert: Dieser Posteingang ist in zu vielen Fenstern geöffnet.",
    },
    es: {
      title: "Notificaciones", bell: "Notificaciones, {n} sin leer", readAll: "Marcar todo como leído",
      archiveRead: "Archivar leídas", empty: "Nada por ahora.", all: "Todas", unread: "Sin leer",
      archived: "Archivadas", snooze: "Posponer", snoozeLabel: "Posponer «{title}»",
      newItem: "Nueva notificación: {title}", grouped: "{n} nuevas", more: "{n} más",
      preferences: "Preferencias de notificación", unavailable: "Las notificaciones no están disponibles.",
      signIn: "Vuelve a iniciar sesión para ver nuevas notificaciones.",
      paused: "Actualizaciones en directo en pausa: esta bandeja está abierta en demasiadas ventanas.",
    },
  };

  const STYLE = `
    :host { --_bg: var(--notify-inbox-bg, #fff); --_fg: var(--notify-inbox-fg, #111);
      --_muted: var(--notify-inbox-muted, #666); --_border: var(--notify-inbox-border, #ddd);
      --_accent: var(--notify-inbox-accent, #2563eb); --_unread: var(--notify-inbox-unread-bg, #eff6ff);
      --_high: var(--notify-inbox-severity-high, #dc2626); --_medium: var(--notify-inbox-severity-medium, #dc2626);
      --_low: var(--notify-inbox-severity-low, #6b7280); --_radius: var(--notify-inbox-radius, 8px);
      position: relative; display: inline-block; font: var(--notify-inbox-font, 15px/1.4 system-ui, sans-serif); }
    @media (prefers-color-scheme: dark) {
      :host(:not([theme=light])) { --_bg: var(--notify-inbox-bg, #1f2937); --_fg: var(--notify-inbox-fg, #f3f4f6);
        --_muted: var(--notify-inbox-muted, #9ca3af); --_border: var(--notify-inbox-border, #374151);
        --_accent: var(--notify-inbox-accent, #60a5fa); --_unread: var(--notify-inbox-unread-bg, #1e3a5f); }
    }
    :host([theme=dark]) { --_bg: var(--notify-inbox-bg, #1f2937); --_fg: var(--notify-inbox-fg, #f3f4f6);
      --_muted: var(--notify-inbox-muted, #9ca3af); --_border: var(--notify-inbox-border, #374151);
      --_accent: var(--notify-inbox-accent, #60a5fa); --_unread: var(--notify-inbox-unread-bg, #1e3a5f); }
    button { font: inherit; color: inherit; }
    .ntf-bell { position: relative; display: inline-flex; background: none; border: 1px solid var(--_border);
      border-radius: 6px; padding: .35rem .5rem; cursor: pointer; color: var(--notify-inbox-bell, currentColor); }
    :focus-visible { outline: 2px solid var(--_accent); outline-offset: -2px; }
    .ntf-badge { position: absolute; top: -.45rem; right: -.55rem; min-width: 1.2rem; padding: 0 .3rem;
      border-radius: 999px; background: var(--_medium); color: #fff; font-size: .75rem; line-height: 1.2rem; }
    .ntf-badge[data-severity=high] { background: var(--_high); }
    .ntf-badge[data-severity=low] { background: var(--_low); }
    [hidden] { display: none !important; }
    .ntf-panel { position: absolute; right: 0; z-index: 1000; width: var(--notify-inbox-width, min(24rem, 90vw));
      max-height: 28rem; overflow: auto; margin-top: .4rem; background: var(--_bg); color: var(--_fg);
      border: 1px solid var(--_border); border-radius: var(--_radius); box-shadow: 0 8px 24px rgba(0,0,0,.18); }
    .ntf-head { display: flex; gap: .5rem; align-items: center; padding: .5rem .75rem;
      border-bottom: 1px solid var(--_border); font-weight: 600; }
    .ntf-head h2 { font-size: 1em; margin: 0; flex: 1; }
    .ntf-action { background: none; border: 0; color: var(--_accent); cursor: pointer; font-weight: 400; font-size: .85em; }
    .ntf-tabs { display: flex; gap: .25rem; padding: .25rem .5rem; border-bottom: 1px solid var(--_border); overflow-x: auto; }
    .ntf-tab { background: none; border: 0; border-bottom: 2px solid transparent; padding: .3rem .5rem; cursor: pointer; }
    .ntf-tab[aria-selected=true] { border-bottom-color: var(--_accent); font-weight: 600; }
    .ntf-tab-count { margin-left: .3rem; color: var(--_muted); font-size: .8em; }
    .ntf-list { list-style: none; margin: 0; padding: 0; }
    .ntf-list li { display: flex; border-bottom: 1px solid var(--_border); }
    .ntf-item { flex: 1; display: block; text-align: left; background: none; border: 0; padding: .6rem .75rem; cursor: pointer; }
    .ntf-item.ntf-unread { background: var(--_unread); }
    .ntf-item.ntf-unread .ntf-title::before { content: "\\25CF  "; color: var(--_accent); }
    .ntf-item[data-severity=high] .ntf-title::before { color: var(--_high); }
    .ntf-title { font-weight: 600; }
    .ntf-body, .ntf-group { color: var(--_muted); }
    .ntf-time { color: var(--_muted); font-size: .8rem; }
    .ntf-snooze { background: none; border: 0; color: var(--_muted); cursor: pointer; font-size: .8rem; padding: 0 .6rem; }
    .ntf-empty, .ntf-status { padding: .75rem; color: var(--_muted); }
    .ntf-foot { padding: .5rem .75rem; font-size: .85em; }
    .ntf-foot a { color: var(--_accent); }
    .ntf-live { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
  `;

  function bellIcon() {
    // Drawn, not an emoji: every platform has the same bell, with or without emoji fonts.
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "22");
    svg.setAttribute("height", "22");
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("fill", "currentColor");
    path.setAttribute(
      "d",
      "M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22Zm7-6V11a7 7 0 0 0-5.5-6.84V3.5a1.5 1.5 0 0 0-3 0v.66A7 7 0 0 0 5 11v5l-2 2v1h18v-1l-2-2Z",
    );
    svg.append(path);
    return svg;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;  // text only: content never becomes markup
    return node;
  }

  function button(className, text) {
    const node = element("button", className, text);
    node.type = "button";
    return node;
  }

  function safeLink(link) {
    // Only web links and relative paths: a javascript: link must never run.
    try {
      const url = new URL(link, window.location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (error) {
      return null;
    }
  }

  function tabQuery(tab, withState) {
    const query = new URLSearchParams();
    if (tab.category) query.set("category", tab.category);
    if (tab.tag) query.set("tag", tab.tag);
    if (withState && tab.archived) query.set("archived", "true");
    if (withState && tab.read !== undefined && tab.read !== null) query.set("read", String(tab.read));
    const text = query.toString();
    return text ? `?${text}` : "";
  }

  function tabShows(tab, item) {
    return Boolean(item.archived) === Boolean(tab.archived)
      && (tab.read === undefined || tab.read === null || item.read === tab.read)
      && (!tab.category || item.category === tab.category)
      && (!tab.tag || (item.tags || []).includes(tab.tag));
  }

  const DEFAULT_TABS = [{ key: "all" }, { key: "unread", read: false }, { key: "archived", archived: true }];

  class NotifyInboxElement extends HTMLElement {
    static get observedAttributes() { return ["token", "locale"]; }

    constructor() {
      super();
      this.items = new Map();
      // Each change pushed or made here is numbered, so that a page read from the API before
      // it cannot undo it.
      this.changes = 0;
      this.changedAt = new Map();
      this.countsChangedAt = 0;
      this.counts = { unread: 0, unseen: 0, limit: 99, severity: null };
      this.tabCounts = new Map();
      this.tabIndex = 0;
      this.retryDelay = 1000;
      this.socket = null;
      this.stopped = true;
      this.profile = null;
      this.getToken = this.getToken || null;
      this.attachShadow({ mode: "open" });
    }

    connectedCallback() {
      if (!this.stopped) return;
      this.stopped = false;
      this.apiUrl = (this.getAttribute("api-url") || window.location.origin).replace(/\/$/, "");
      this.token = this.token || this.getAttribute("token");
      this.tabs = this.readTabs();
      this.render();
      this.connect();
    }

    disconnectedCallback() {
      this.stopped = true;
      clearTimeout(this.reconnectTimer);
      clearTimeout(this.expiryTimer);
      if (this.socket) this.socket.close();
    }

    attributeChangedCallback(name, old, value) {
      if (name === "token" && value) this.token = value;
      if (name === "locale" && this.bell) this.update();
    }

    readTabs() {
      try {
        const tabs = JSON.parse(this.getAttribute("tabs") || "null");
        if (Array.isArray(tabs) && tabs.length) return tabs;
      } catch (error) {
        console.warn("notify-inbox: the tabs attribute is not JSON", error);
      }
      return DEFAULT_TABS;
    }

    // --- strings ---------------------------------------------------------------------------
    t(key, values) {
      const wanted = this.getAttribute("locale") || (this.profile && this.profile.locale) || navigator.language || "en";
      const language = wanted.toLowerCase().split(/[-_]/)[0];
      const table = STRINGS[language] || STRINGS.en;
      const text = table[key] || STRINGS.en[key];
      return text.replace(/\{(\w+)\}/g, (match, name) => (values && name in values ? values[name] : match));
    }

    tabLabel(tab) {
      return tab.label || this.t(tab.key || "all");
    }

    // --- the inbox API ---------------------------------------------------------------------
    async api(path, method, body) {
      const headers = { Authorization: `Bearer ${this.token}` };
      if (body) headers["Content-Type"] = "application/json";
      const response = await fetch(`${this.apiUrl}/inbox/v1/${path}`, {
        method: method || "GET", headers, body: body ? JSON.stringify(body) : undefined,
      });
      if (response.status === 401 && (await this.refreshToken())) return this.api(path, method, body);
      if (!response.ok) throw new Error(`inbox API answered ${response.status}`);
      return response.json();
    }

    async refreshToken() {
      if (!this.getToken) return false;
      this.token = await this.getToken();
      return Boolean(this.token);
    }

    async reload() {
      if (!this.profile) this.profile = await this.api("profile").catch(() => null);
      const tab = this.tabs[this.tabIndex];
      const started = this.changes;
      const [, counts] = await Promise.all([this.readPage(tabQuery(tab, true)), this.api("counts")]);
      if (this.countsChangedAt <= started) this.counts = counts;
      this.update();
      this.refreshTabCounts();
    }

    async readPage(query) {
      // Merged, not replaced, and a change pushed or made while the request was under way
      // wins: the page may have been read before it (a snooze from another tab, say).
      const started = this.changes;
      const page = await this.api(`items${query}`);
      page.results.forEach((item) => { if ((this.changedAt.get(item.id) || 0) <= started) this.keep(item); });
    }

    changed(id) {
      this.changedAt.set(id, ++this.changes);
    }

    keepChange(item) {
      this.changed(item.id);
      this.keep(item);
    }

    refreshTabCounts() {
      // Each tab's counts come from the server (bounded there), never from the items held here,
      // which are a page of them: after any change, so they cannot go stale.
      clearTimeout(this.tabCountsTimer);
      this.tabCountsTimer = setTimeout(() => {
        this.tabs.forEach((tab, index) => {
          if (!tab.category && !tab.tag) return;
          this.api(`counts${tabQuery(tab, false)}`)
            .then((counts) => { this.tabCounts.set(index, counts); this.update(); })
            .catch(() => {});
        });
      }, TAB_COUNTS_DELAY);
    }

    // --- the live connection ---------------------------------------------------------------
    newestId() {
      // A snoozed item's place is in the future: the cursor is the newest one shown.
      const now = new Date().toISOString();
      let newest = null;
      for (const item of this.items.values()) {
        if (item.sort_at <= now && (!newest || item.sort_at > newest.sort_at)) newest = item;
      }
      return newest && newest.id;
    }

    connect() {
      const url = new URL(`${this.apiUrl.replace(/^http/, "ws")}/inbox/v1/ws`);
      // With a cursor the server sends what was missed; without one the list is read once
      // the connection is up, so nothing stored in between can fall through.
      const after = this.newestId();
      if (after) url.searchParams.set("after", after);
      const socket = new WebSocket(url);
      this.socket = socket;
      socket.onopen = () => socket.send(JSON.stringify({ type: "auth", token: this.token }));
      socket.onmessage = (event) => this.receive(socket, JSON.parse(event.data), !after);
      socket.onclose = (event) => this.closed(event.code);
    }

    setConnected(value) {
      this.dataset.connected = value;
      if (this.mountRoot) this.mountRoot.dataset.connected = value;
    }

    keep(item) {
      // One item per group: the newest carries the group's count and actors.
      if (item.group_key) {
        for (const [id, held] of this.items) {
          if (id !== item.id && held.group_key === item.group_key && !held.archived && held.sort_at <= item.sort_at) {
            this.items.delete(id);
            this.changedAt.delete(id);
          }
        }
      }
      this.items.set(item.id, item);
    }

    receive(socket, message, needsList) {
      switch (message.type) {
        case "hello":
          this.retryDelay = 1000;
          this.status.hidden = true;
          this.setConnected("true");
          this.counts = message.counts;
          if (needsList) this.reload().catch(() => this.showStatus(this.t("unavailable")));
          break;
        case "catch_up":
          message.items.forEach((item) => this.keepChange(item));
          if (message.more) this.reload().catch(() => {});
          break;
        case "item":
          this.keepChange(message.item);
          this.announce(message.item);
          this.emit("notify-inbox-item", { item: message.item });
          break;
        case "item_updated":
          this.keepChange(message.item);
          break;
        case "counts":
          this.counts = message.counts;
          this.countsChangedAt = ++this.changes;
          this.emit("notify-inbox-counts", { counts: message.counts });
          this.refreshTabCounts();
          break;
        case "ping":
          socket.send(JSON.stringify({ type: "pong" }));
          return;
        default:
          return;
      }
      this.update();
    }

    async closed(code) {
      this.setConnected("false");
      if (this.stopped) return;
      if (code === CLOSE_TOKEN_INVALID || (code === CLOSE_TOKEN_EXPIRED && !(await this.refreshToken()))) {
        this.showStatus(this.t("signIn"));
        return;
      }
      if (code === CLOSE_TOO_MANY_SOCKETS) {
        // This inbox is open in as many tabs and devices as the server allows: show the list
        // from the API, and try again at the longest interval, as one of them may close.
        this.showStatus(this.t("paused"));
        if (!this.items.size) this.reload().catch(() => {});
        this.retryDelay = MAX_RETRY_DELAY;
      }
      // Back off with jitter, up to 30 s, so that a restarting server is not stormed by its
      // clients all coming back at once.
      const delay = this.retryDelay * (0.5 + Math.random() / 2);
      this.reconnectTimer = setTimeout(() => this.connect(), delay);
      this.retryDelay = Math.min(this.retryDelay * 2, MAX_RETRY_DELAY);
    }

    emit(name, detail, cancelable) {
      return this.dispatchEvent(new CustomEvent(name, { detail, bubbles: true, composed: true, cancelable: Boolean(cancelable) }));
    }

    // --- actions ---------------------------------------------------------------------------
    async open(item) {
      if (!item.read) {
        item.read = item.seen = true;  // at once; the server's item_updated and counts follow
        this.changed(item.id);  // held already: only its state changes
        this.counts.unread = Math.max(0, this.counts.unread - 1);
        this.countsChangedAt = this.changes;
        this.update();
        await this.api(`items/${item.id}/read`, "POST").catch(() => {});
      }
      const link = item.link && safeLink(item.link);
      if (this.emit("notify-inbox-open", { item }, true) && link) window.location.assign(link);
    }

    async snooze(item) {
      const minutes = Number(this.getAttribute("snooze-minutes")) || 60;
      const until = new Date(Date.now() + minutes * 60000).toISOString();
      const next = this.focusAfterRemoving(item);
      this.keepChange(Object.assign({}, item, { sort_at: until, snoozed_until: until }));
      this.update();
      const target = next && next();
      (target || this.tabButtons[this.tabIndex]).focus();
      await this.api(`items/${item.id}/snooze`, "POST", { until }).catch(() => {});
    }

    focusAfterRemoving(item) {
      // Focus moves to the next item (or the previous one), never to the page's top.
      const rows = [...this.list.querySelectorAll(".ntf-item")];
      const index = rows.findIndex((row) => row.dataset.id === item.id);
      const next = rows[index + 1] || rows[index - 1];
      return next ? () => this.list.querySelector(`.ntf-item[data-id="${next.dataset.id}"]`) : null;
    }

    async readTab() {
      const tab = this.tabs[this.tabIndex];
      this.items.forEach((item) => {
        if (!tabShows(Object.assign({}, tab, { read: null }), item)) return;
        item.read = item.seen = true;
        this.changed(item.id);
      });
      this.update();
      await this.api(`items/read-all${tabQuery(tab, false)}`, "POST").catch(() => {});
    }

    async archiveRead() {
      const tab = this.tabs[this.tabIndex];
      this.items.forEach((item) => {
        if (!item.read || !tabShows(Object.assign({}, tab, { read: null, archived: false }), item)) return;
        item.archived = true;
        this.changed(item.id);
      });
      this.update();
      await this.api(`items/archive-read${tabQuery(tab, false)}`, "POST").catch(() => {});
    }

    selectTab(index, focus) {
      this.tabIndex = (index + this.tabs.length) % this.tabs.length;
      this.update();
      if (focus) this.tabButtons[this.tabIndex].focus();
      const tab = this.tabs[this.tabIndex];
      this.readPage(tabQuery(tab, true)).then(() => this.update()).catch(() => {});
    }

    // --- rendering -------------------------------------------------------------------------
    render() {
      const root = this.shadowRoot;
      const style = element("style");
      style.textContent = STYLE;
      this.bell = button("ntf-bell");
      this.bell.part = "bell";
      this.bell.append(bellIcon());
      this.bell.setAttribute("aria-haspopup", "dialog");
      this.bell.setAttribute("aria-expanded", "false");
      this.badge = element("span", "ntf-badge");
      this.badge.part = "badge";
      this.badge.hidden = true;
      this.bell.append(this.badge);
      this.panel = element("div", "ntf-panel");
      this.panel.part = "panel";
      this.panel.id = "ntf-panel";
      this.panel.hidden = true;
      this.panel.setAttribute("role", "dialog");
      this.bell.setAttribute("aria-controls", "ntf-panel");
      const head = element("div", "ntf-head");
      this.heading = element("h2", "", "");
      this.heading.id = "ntf-heading";
      this.panel.setAttribute("aria-labelledby", "ntf-heading");
      this.readAllButton = button("ntf-action ntf-read-all");
      this.readAllButton.addEventListener("click", () => this.readTab());
      this.archiveButton = button("ntf-action ntf-archive-read");
      this.archiveButton.addEventListener("click", () => this.archiveRead());
      head.append(this.heading, this.readAllButton, this.archiveButton);
      const tabs = element("div", "ntf-tabs");
      tabs.setAttribute("role", "tablist");
      this.tabButtons = this.tabs.map((tab, index) => {
        const tabButton = button("ntf-tab");
        tabButton.setAttribute("role", "tab");
        tabButton.addEventListener("click", () => this.selectTab(index, false));
        tabs.append(tabButton);
        return tabButton;
      });
      tabs.addEventListener("keydown", (event) => {
        const moves = { ArrowRight: 1, ArrowLeft: -1 };
        if (event.key in moves) { event.preventDefault(); this.selectTab(this.tabIndex + moves[event.key], true); }
      });
      this.list = element("ul", "ntf-list");
      this.list.setAttribute("role", "list");
      this.list.addEventListener("keydown", (event) => this.listKey(event));
      this.status = element("div", "ntf-status");
      this.status.hidden = true;
      this.status.setAttribute("role", "status");
      const foot = element("div", "ntf-foot");
      this.preferences = element("a", "ntf-preferences");
      this.preferences.hidden = true;
      this.preferences.rel = "noopener";
      foot.append(this.preferences);
      this.panel.append(head, tabs, this.status, this.list, foot);
      // Polite: announced when the reader is idle, never cutting the person off.
      this.live = element("div", "ntf-live");
      this.live.setAttribute("aria-live", "polite");
      this.live.setAttribute("role", "status");
      root.replaceChildren(style, this.bell, this.panel, this.live);
      this.bell.addEventListener("click", () => this.toggle());
      this.panel.addEventListener("keydown", (event) => {
        if (event.key === "Escape") { event.preventDefault(); this.toggle(false); this.bell.focus(); }
      });
      document.addEventListener("click", (event) => {
        if (!this.panel.hidden && !event.composedPath().includes(this)) this.toggle(false);
      });
      this.update();
    }

    listKey(event) {
      const rows = [...this.list.querySelectorAll(".ntf-item")];
      const index = rows.indexOf(this.shadowRoot.activeElement);
      const targets = { ArrowDown: index + 1, ArrowUp: index - 1, Home: 0, End: rows.length - 1 };
      if (!(event.key in targets) || !rows.length) return;
      event.preventDefault();
      rows[Math.max(0, Math.min(rows.length - 1, targets[event.key]))].focus();
    }

    toggle(open) {
      const show = open === undefined ? this.panel.hidden : open;
      this.panel.hidden = !show;
      this.bell.setAttribute("aria-expanded", String(show));
      if (show) {
        // Focus goes into the panel: to the first item, or the selected tab when there is none.
        const first = this.list.querySelector(".ntf-item") || this.tabButtons[this.tabIndex];
        first.focus();
      }
    }

    announce(item) {
      this.live.textContent = this.t("newItem", { title: item.title || item.body });
    }

    showStatus(text) {
      this.status.textContent = text;
      this.status.hidden = false;
    }

    bounded(counts) {
      const limit = counts.limit || 99;
      return counts.unread > limit ? `${limit}+` : String(counts.unread);
    }

    update() {
      const shown = this.bounded(this.counts);
      this.badge.textContent = shown;
      this.badge.hidden = this.counts.unread === 0;
      this.badge.dataset.severity = this.counts.severity || "";
      this.bell.setAttribute("aria-label", this.t("bell", { n: shown }));
      this.heading.textContent = this.t("title");
      this.panel.setAttribute("aria-label", this.t("title"));
      this.readAllButton.textContent = this.t("readAll");
      this.archiveButton.textContent = this.t("archiveRead");
      if (this.profile && this.profile.preferences_url && safeLink(this.profile.preferences_url)) {
        this.preferences.href = this.profile.preferences_url;
        this.preferences.textContent = this.t("preferences");
        this.preferences.hidden = false;
      }
      this.tabs.forEach((tab, index) => {
        const tabButton = this.tabButtons[index];
        const selected = index === this.tabIndex;
        tabButton.setAttribute("aria-selected", String(selected));
        tabButton.tabIndex = selected ? 0 : -1;  // one tab stop; arrows move between tabs
        const counts = tab.category || tab.tag ? this.tabCounts.get(index) : (tab.archived ? null : this.counts);
        const label = element("span", "ntf-tab-label", this.tabLabel(tab));
        tabButton.replaceChildren(label);
        if (counts && counts.unread) tabButton.append(element("span", "ntf-tab-count", this.bounded(counts)));
      });
      const now = new Date().toISOString();
      const tab = this.tabs[this.tabIndex];
      const items = [...this.items.values()]
        .filter((item) => tabShows(tab, item) && item.sort_at <= now && !(item.expires_at && item.expires_at <= now))
        .sort((a, b) => (a.sort_at < b.sort_at ? 1 : -1));
      const focused = this.shadowRoot.activeElement;
      const focusedId = focused && focused.dataset && focused.dataset.id;
      this.list.replaceChildren(
        ...(items.length ? items.map((item) => this.row(item)) : [element("li", "ntf-empty", this.t("empty"))]),
      );
      if (focusedId) {
        const again = this.list.querySelector(`.ntf-item[data-id="${focusedId}"]`);
        if (again) again.focus();
      }
      this.scheduleChanges(now);
    }

    scheduleChanges(now) {
      // Redraw when the next item expires or comes back from its snooze.
      clearTimeout(this.expiryTimer);
      let next = null;
      for (const item of this.items.values()) {
        for (const at of [item.expires_at, item.sort_at]) {
          if (at && at > now && (!next || at < next)) next = at;
        }
      }
      if (next) this.expiryTimer = setTimeout(() => this.update(), Math.min(Date.parse(next) - Date.now() + 50, 2 ** 31 - 1));
    }

    row(item) {
      const entry = element("li");
      const open = button(`ntf-item${item.read ? "" : " ntf-unread"}`);
      open.dataset.id = item.id;
      open.dataset.severity = item.severity || "";
      open.append(element("div", "ntf-title", item.title), element("div", "ntf-body", item.body));
      if (item.group_count > 1) {
        const actors = (item.actors || []).join(", ");
        const more = item.group_count - (item.actors || []).length;
        const who = actors + (actors && more > 0 ? ` +${this.t("more", { n: more })}` : "");
        open.append(element("div", "ntf-group", [this.t("grouped", { n: item.group_count }), who].filter(Boolean).join(" · ")));
      }
      open.append(element("div", "ntf-time", new Date(item.sort_at).toLocaleString(this.getAttribute("locale") || undefined)));
      open.addEventListener("click", () => this.open(item));
      entry.append(open);
      if (!item.archived) {
        const snooze = button("ntf-snooze", this.t("snooze"));
        snooze.setAttribute("aria-label", this.t("snoozeLabel", { title: item.title || item.body }));
        snooze.addEventListener("click", () => this.snooze(item));
        entry.append(snooze);
      }
      return entry;
    }
  }

  if (!customElements.get("notify-inbox")) customElements.define("notify-inbox", NotifyInboxElement);

  window.NotifyInbox = {
    // The older way in, kept for pages that use it: the element, placed in `root`.
    mount(root, options) {
      const inbox = document.createElement("notify-inbox");
      options = options || {};
      if (options.apiUrl) inbox.setAttribute("api-url", options.apiUrl);
      for (const name of ["locale", "theme", "tabs"]) {
        if (options[name]) inbox.setAttribute(name, typeof options[name] === "string" ? options[name] : JSON.stringify(options[name]));
      }
      inbox.token = options.token;
      inbox.getToken = options.getToken || null;
      inbox.mountRoot = root;
      root.append(inbox);
      return inbox;
    },
  };
})();
