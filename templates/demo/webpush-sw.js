// The demo's service worker: shows each web push message, and opens its link on a click.
self.addEventListener("push", (event) => {
  const message = event.data ? event.data.json() : { title: "Notification", body: "" };
  event.waitUntil(
    self.registration.showNotification(message.title || "Notification", {
      body: message.body,
      data: { link: message.link || "/", clickUrl: message.click_url },
      // A repeat, or a newer message with the same replace key, replaces the one shown.
      tag: message.tag || message.delivery_id,
    }),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const { link, clickUrl } = event.notification.data;
  // Report the click, so that web push clicks count in the engagement analytics.
  const reported = clickUrl ? fetch(clickUrl, { method: "POST", keepalive: true }).catch(() => {}) : Promise.resolve();
  event.waitUntil(Promise.all([clients.openWindow(link), reported]));
});
