//! Kubernetes Events (`events.k8s.io/v1`) about OutboxRelays, as `kubectl
//! describe` shows them: an occurrence repeating the same reason **and the
//! same note** within six minutes becomes a series (count, last seen), a
//! different note is an Event of its own, so the latest message is what a
//! user reads.
//!
//! kube's `Recorder` keys its series without the note, and the API server
//! refuses to change a v1 Event's note, so later, different occurrences were
//! counted under the first message (`Stalled (x3) ... since the resource was
//! created`).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;

/// How long a repeat joins the series of the first occurrence.
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

/// What makes two occurrences the same Event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    type_: EventType,
    reason: String,
    note: String,
}

pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    recent: tokio::sync::Mutex<HashMap<Key, Event>>,
}

impl Recorder {
    /// `controller` is the reporting controller; `instance` this replica
    /// (default: the controller's name).
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Recorder {
        Recorder {
            client,
            controller: controller.into(),
            instance: instance.unwrap_or_else(|| controller.into()),
            recent: Default::default(),
        }
    }

    /// Records one occurrence regarding `regarding`.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = Key {
            namespace: regarding.namespace.clone(),
            name: regarding.name.clone(),
            uid: regarding.uid.clone(),
            type_,
            reason: reason.into(),
            note: note.into(),
        };
        let mut recent = self.recent.lock().await;
        recent.retain(|_, e| last_seen(e).is_some_and(|t| t + SERIES_WINDOW > now));
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let event = match recent.get(&key) {
            Some(first) => {
                let mut e = first.clone();
                e.series = Some(EventSeries {
                    count: first.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                });
                let patch = serde_json::json!({"series": e.series});
                api.patch(
                    e.metadata.name.as_deref().unwrap_or_default(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
                e
            }
            None => {
                let e = Event {
                    metadata: ObjectMeta {
                        namespace: Some(ns.into()),
                        name: Some(format!(
                            "{}.{:x}",
                            regarding.name.as_deref().unwrap_or(&self.controller),
                            now.as_nanosecond()
                        )),
                        ..ObjectMeta::default()
                    },
                    event_time: Some(MicroTime(now)),
                    type_: Some(format!("{type_:?}")),
                    reason: Some(reason.into()),
                    action: Some(action.into()),
                    note: Some(note.into()),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Event::default()
                };
                api.create(&PostParams::default(), &e).await?
            }
        };
        recent.insert(key, event);
        Ok(())
    }
}

fn last_seen(e: &Event) -> Option<Timestamp> {
    match &e.series {
        Some(s) => Some(s.last_observed_time.0),
        None => e.event_time.as_ref().map(|t| t.0),
    }
}
