// The demo's service worker: shows each web push message, and opens its link on a click.
self.addEventListener("push", (event) => {
  const message = event.data ? event.data.json() : { title: "Notification", body: "" };
  event.waitUntil(
    self.registration.showNotification(message.title || "Notification", {
      body: message.body,
      data: { link: message.link || "/" },
      // A repeat, or a newer message with the same replace key, replaces the one shown.
      tag: message.tag || message.delivery_id,
    }),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  event.waitUntil(clients.openWindow(event.notification.data.link));
});
