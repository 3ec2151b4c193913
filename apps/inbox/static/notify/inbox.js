/*
 * Notify inbox widget: a bell with an unread badge and a list of the recipient's in-app
 * notifications, updated live over WebSocket. One script tag, no build step, no dependencies.
 *
 *   <div id="inbox"></div>
 *   <script src="https://notify.example.com/static/notify/inbox.js"></script>
 *   <script>
 *     NotifyInbox.mount(document.getElementById("inbox"), {
 *       apiUrl: "https://notify.example.com",
 *       token: "<recipient token from POST /api/v1/inbox-tokens, made by your server>",
 *       getToken: async () => "<a fresh token>",   // used when the token expires
 *     });
 *   </script>
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
  const STYLE = `
    .ntf-inbox { position: relative; display: inline-block; font: 15px/1.4 system-ui, sans-serif; }
    .ntf-bell { position: relative; display: inline-flex; background: none; border: 1px solid #ccc;
      border-radius: 6px; padding: .35rem .5rem; cursor: pointer; color: #333; }
    .ntf-bell:focus-visible, .ntf-item:focus-visible, .ntf-read-all:focus-visible { outline: 2px solid #2563eb; }
    .ntf-badge { position: absolute; top: -.45rem; right: -.55rem; min-width: 1.2rem; padding: 0 .3rem;
      border-radius: 999px; background: #dc2626; color: #fff; font-size: .75rem; line-height: 1.2rem; }
    .ntf-badge[hidden] { display: none; }
    .ntf-panel { position: absolute; right: 0; z-index: 1000; width: min(22rem, 90vw); max-height: 26rem;
      overflow: auto; margin-top: .4rem; background: #fff; color: #111; border: 1px solid #ddd;
      border-radius: 8px; box-shadow: 0 8px 24px rgba(0,0,0,.12); }
    .ntf-panel[hidden] { display: none; }
    .ntf-head { display: flex; justify-content: space-between; align-items: center; padding: .5rem .75rem;
      border-bottom: 1px solid #eee; font-weight: 600; }
    .ntf-read-all { background: none; border: 0; color: #2563eb; cursor: pointer; font: inherit; font-weight: 400; }
    .ntf-list { list-style: none; margin: 0; padding: 0; }
    .ntf-item { display: block; width: 100%; text-align: left; background: none; border: 0;
      border-bottom: 1px solid #f2f2f2; padding: .6rem .75rem; cursor: pointer; font: inherit; color: inherit; }
    .ntf-item.ntf-unread { background: #eff6ff; }
    .ntf-item.ntf-unread .ntf-title::before { content: "\\25CF  "; color: #2563eb; }
    .ntf-title { font-weight: 600; }
    .ntf-body { color: #444; }
    .ntf-time { color: #888; font-size: .8rem; }
    .ntf-empty, .ntf-status { padding: .75rem; color: #666; }
  `;

  function styleOnce() {
    if (document.getElementById("ntf-inbox-style")) return;
    const style = document.createElement("style");
    style.id = "ntf-inbox-style";
    style.textContent = STYLE;
    document.head.append(style);
  }

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

  function safeLink(link) {
    // Only web links and relative paths: a javascript: link must never run.
    try {
      const url = new URL(link, window.location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (error) {
      return null;
    }
  }

  class Inbox {
    constructor(root, options) {
      this.root = root;
      this.apiUrl = (options.apiUrl || window.location.origin).replace(/\/$/, "");
      this.token = options.token;
      this.getToken = options.getToken;
      this.items = new Map();
      this.counts = { unread: 0, unseen: 0 };
      this.retryDelay = 1000;
      this.socket = null;
      this.stopped = false;
      this.render();
      this.connect();
    }

    // --- the inbox API -----------------------------------------------------------------
    async api(path, method) {
      const response = await fetch(`${this.apiUrl}/inbox/v1/${path}`, {
        method: method || "GET",
        headers: { Authorization: `Bearer ${this.token}` },
      });
      if (response.status === 401 && (await this.refreshToken())) return this.api(path, method);
      if (!response.ok) throw new Error(`inbox API answered ${response.status}`);
      return response.json();
    }

    async refreshToken() {
      if (!this.getToken) return false;
      this.token = await this.getToken();
      return Boolean(this.token);
    }

    async reload() {
      // Merged, not replaced: an item pushed while this request was under way stays.
      const [page, counts] = await Promise.all([this.api("items"), this.api("counts")]);
      page.results.forEach((item) => this.items.set(item.id, item));
      this.counts = counts;
      this.update();
    }

    // --- the live connection -----------------------------------------------------------
    newestId() {
      let newest = null;
      for (const item of this.items.values()) {
        if (!newest || item.created_at > newest.created_at) newest = item;
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

    receive(socket, message, needsList) {
      switch (message.type) {
        case "hello":
          this.retryDelay = 1000;
          this.status.hidden = true;
          this.root.dataset.connected = "true";
          this.counts = message.counts;
          if (needsList) this.reload().catch((error) => this.showStatus(`Notifications are unavailable: ${error.message}`));
          break;
        case "catch_up":
          message.items.forEach((item) => this.items.set(item.id, item));
          if (message.more) this.reload().catch(() => {});
          break;
        case "item":
        case "item_updated":
          this.items.set(message.item.id, message.item);
          break;
        case "counts":
          this.counts = message.counts;
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
      this.root.dataset.connected = "false";
      if (this.stopped) return;
      if (code === CLOSE_TOKEN_INVALID || (code === CLOSE_TOKEN_EXPIRED && !(await this.refreshToken()))) {
        this.showStatus("Sign in again to see new notifications.");
        return;
      }
      if (code === CLOSE_TOO_MANY_SOCKETS) {
        // This inbox is open in as many tabs and devices as the server allows: show the list
        // from the API, and try again at the longest interval, as one of them may close.
        this.showStatus("Live updates are paused: this inbox is open in too many windows.");
        if (!this.items.size) this.reload().catch(() => {});
        this.retryDelay = MAX_RETRY_DELAY;
      }
      // Back off, up to 30 s, so that a restarting server is not stormed by its clients.
      this.reconnectTimer = setTimeout(() => this.connect(), this.retryDelay);
      this.retryDelay = Math.min(this.retryDelay * 2, MAX_RETRY_DELAY);
    }

    // --- actions -------------------------------------------------------------------------
    async open(item) {
      if (!item.read) {
        item.read = item.seen = true;  // at once; the server's item_updated and counts follow
        this.counts.unread = Math.max(0, this.counts.unread - 1);
        this.update();
        await this.api(`items/${item.id}/read`, "POST").catch(() => {});
      }
      const link = item.link && safeLink(item.link);
      if (link) window.location.assign(link);
    }

    async readAll() {
      this.items.forEach((item) => { item.read = item.seen = true; });
      this.counts.unread = 0;
      this.update();
      await this.api("items/read-all", "POST").catch(() => {});
    }

    // --- rendering -----------------------------------------------------------------------
    render() {
      styleOnce();
      this.root.classList.add("ntf-inbox");
      this.bell = element("button", "ntf-bell");
      this.bell.append(bellIcon());
      this.bell.type = "button";
      this.bell.setAttribute("aria-haspopup", "true");
      this.bell.setAttribute("aria-expanded", "false");
      this.badge = element("span", "ntf-badge");
      this.badge.hidden = true;
      this.bell.append(this.badge);
      this.panel = element("div", "ntf-panel");
      this.panel.hidden = true;
      this.panel.setAttribute("role", "region");
      this.panel.setAttribute("aria-label", "Notifications");
      const head = element("div", "ntf-head", "Notifications");
      const readAll = element("button", "ntf-read-all", "Mark all read");
      readAll.type = "button";
      readAll.addEventListener("click", () => this.readAll());
      head.append(readAll);
      this.list = element("ul", "ntf-list");
      this.status = element("div", "ntf-status");
      this.status.hidden = true;
      this.status.setAttribute("role", "status");
      this.panel.append(head, this.status, this.list);
      this.root.append(this.bell, this.panel);
      this.bell.addEventListener("click", () => this.toggle());
      this.root.addEventListener("keydown", (event) => {
        if (event.key === "Escape" && !this.panel.hidden) { this.toggle(); this.bell.focus(); }
      });
    }

    toggle() {
      this.panel.hidden = !this.panel.hidden;
      this.bell.setAttribute("aria-expanded", String(!this.panel.hidden));
    }

    showStatus(text) {
      this.status.textContent = text;
      this.status.hidden = false;
    }

    update() {
      const unread = this.counts.unread;
      this.badge.textContent = unread > 99 ? "99+" : String(unread);
      this.badge.hidden = unread === 0;
      this.bell.setAttribute("aria-label", `Notifications, ${unread} unread`);
      const items = [...this.items.values()]
        .filter((item) => !item.archived)
        .sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
      this.list.replaceChildren(
        ...(items.length ? items.map((item) => this.row(item)) : [element("li", "ntf-empty", "Nothing yet.")]),
      );
    }

    row(item) {
      const entry = element("li");
      const button = element("button", `ntf-item${item.read ? "" : " ntf-unread"}`);
      button.type = "button";
      button.dataset.id = item.id;
      button.append(
        element("div", "ntf-title", item.title),
        element("div", "ntf-body", item.body),
        element("div", "ntf-time", new Date(item.created_at).toLocaleString()),
      );
      button.addEventListener("click", () => this.open(item));
      entry.append(button);
      return entry;
    }

    stop() {
      this.stopped = true;
      clearTimeout(this.reconnectTimer);
      if (this.socket) this.socket.close();
    }
  }

  window.NotifyInbox = {
    mount(root, options) {
      return new Inbox(root, options || {});
    },
  };
})();
