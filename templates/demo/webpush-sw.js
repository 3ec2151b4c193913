// The demo's service worker: shows each web push message, and on a click opens its link and
// reports the click (the message's signed click_url), which the analytics count.
self.addEventListener("push", (event) => {
  const message = event.data ? event.data.json() : { title: "Notification", body: "" };
  event.waitUntil(
    self.registration.showNotification(message.title || "Notification", {
      body: message.body,
      data: { link: message.link || "/", clickUrl: message.click_url || "" },
      // A repeat, or a newer message with the same replace key, replaces the one shown.
      tag: message.tag || message.delivery_id,
    }),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const { link, clickUrl } = event.notification.data;
  // no-cors: the service may be on another origin than the site; the report needs no answer.
  const report = clickUrl
    ? fetch(clickUrl, { method: "POST", mode: "no-cors", keepalive: true }).catch(() => undefined)
    : Promise.resolve();
  event.waitUntil(Promise.all([clients.openWindow(link), report]));
});
