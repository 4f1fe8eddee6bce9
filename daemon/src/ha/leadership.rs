//! Who leads the cluster now, and this daemon's campaign (`novacron_cluster::election`).
//!
//! On etcd every daemon is a candidate; on the embedded store only the daemon that holds
//! it (the others would lose to it anyway, and cannot lead without it). A daemon that wins
//! starts the ClusterSupervisor with its tenure and stops it when the tenure ends; the
//! others keep a client of the leader for what only the leader decides.

use crate::client::{Client, Connect};
use crate::cluster::{ClusterArgs, ClusterMsg, ClusterSupervisor};
use novacron_cluster::election::{Campaign, Candidate, Tenure};
use novacron_cluster::timing::Timing;
use ractor::ActorRef;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::Status;

/// How long a follower waits on the leader key before it looks again anyway.
const VACANCY_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
enum View {
    #[default]
    Unknown,
    Me(ActorRef<ClusterMsg>, Tenure),
    Other {
        host: String,
        client: Box<Client>,
    },
}

/// Who leads now, as the control port asks it.
#[derive(Clone, Default)]
pub struct Leadership {
    view: Arc<RwLock<View>>,
}

impl Leadership {
    fn set(&self, view: View) {
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
    }

    fn get(&self) -> View {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The ClusterSupervisor, when this daemon leads.
    pub fn cluster(&self) -> Option<ActorRef<ClusterMsg>> {
        match self.get() {
            View::Me(actor, _) => Some(actor),
            _ => None,
        }
    }

    /// This daemon's tenure, when it leads.
    pub fn tenure(&self) -> Option<Tenure> {
        match self.get() {
            View::Me(_, tenure) => Some(tenure),
            _ => None,
        }
    }

    /// A client of the leader, when another daemon leads.
    pub fn leader_client(&self) -> Option<Client> {
        match self.get() {
            View::Other { client, .. } => Some(*client),
            _ => None,
        }
    }

    /// The leader's host name, if one is known.
    pub fn leader_host(&self, me: &str) -> Option<String> {
        match self.get() {
            View::Me(..) => Some(me.to_string()),
            View::Other { host, .. } => Some(host),
            View::Unknown => None,
        }
    }

    /// No leader is known (an election is under way).
    pub fn vacant(&self) -> Status {
        Status::unavailable("the cluster has no leader right now (an election is under way); try again in a moment")
    }
}

/// What the campaign needs.
pub struct Campaigner {
    pub candidate: Candidate,
    /// This daemon's host name.
    pub host: String,
    pub cluster_args: Box<dyn Fn(Tenure) -> ClusterArgs + Send + Sync>,
    pub tls_dir: PathBuf,
    pub timing: Timing,
    /// This daemon may lead (see the module doc).
    pub may_lead: bool,
}

/// Runs the campaign for as long as the daemon runs, keeping `leadership` up to date.
/// The first round is over when this returns: a daemon that can lead leads (or knows
/// who does) before its port opens.
pub async fn start(campaigner: Campaigner, leadership: Leadership) {
    let campaigner = Arc::new(campaigner);
    let mut first = round(&campaigner, &leadership).await;
    if let Next::Retry0 = first {
        first = round(&campaigner, &leadership).await;
    }
    if let Next::Lead(tenure) = first {
        first = match take_office(&campaigner, &leadership, tenure).await {
            Some(actor) => Next::Hold(actor, tenure),
            None => Next::Retry,
        };
    }
    tokio::spawn(async move {
        let mut next = first;
        loop {
            match next {
                Next::Lead(tenure) => {
                    if let Some(actor) = take_office(&campaigner, &leadership, tenure).await {
                        hold_office(&campaigner, &leadership, actor, tenure).await;
                    }
                }
                Next::Hold(actor, tenure) => hold_office(&campaigner, &leadership, actor, tenure).await,
                Next::Watch => {
                    if let Err(e) = campaigner.candidate.wait_vacant(VACANCY_WAIT).await {
                        tracing::debug!("watching the leader: {}", novacron_actors::error_chain(&e));
                        tokio::time::sleep(campaigner.timing.renew).await;
                    }
                }
                Next::Retry => tokio::time::sleep(campaigner.timing.renew).await,
                Next::Retry0 => {}
            }
            next = round(&campaigner, &leadership).await;
        }
    });
}

enum Next {
    Lead(Tenure),
    /// Leading already: renew the tenure.
    Hold(ActorRef<ClusterMsg>, Tenure),
    /// Someone leads: wait until the office is vacant.
    Watch,
    Retry,
    /// Campaign again at once.
    Retry0,
}

/// One campaign (or, for a daemon that may not lead, one look at who leads).
async fn round(campaigner: &Campaigner, leadership: &Leadership) -> Next {
    let outcome = if campaigner.may_lead {
        campaigner.candidate.campaign().await.map(Some)
    } else {
        campaigner.candidate.leader().await.map(|l| l.map(|(record, _)| Campaign::Lost(record)))
    };
    match outcome {
        Ok(Some(Campaign::Won(tenure))) => Next::Lead(tenure),
        Ok(Some(Campaign::Lost(record))) if record.host == campaigner.host => {
            // This host's daemon of before (it crashed: this one could not run beside it,
            // their stores are one file) still holds the office until its lease runs out:
            // end it now.
            tracing::info!("the cluster's leader is this host's previous daemon; taking over");
            if let Err(e) = campaigner.candidate.revoke(record.lease).await {
                tracing::warn!("cannot end the previous daemon's tenure: {}", novacron_actors::error_chain(&e));
            }
            Next::Retry0
        }
        Ok(Some(Campaign::Lost(record))) => {
            follow(campaigner, leadership, &record).await;
            Next::Watch
        }
        Ok(None) => Next::Retry,
        Err(e) => {
            tracing::warn!("cannot campaign: {}", novacron_actors::error_chain(&e));
            leadership.set(View::Unknown);
            Next::Retry
        }
    }
}

async fn follow(campaigner: &Campaigner, leadership: &Leadership, record: &novacron_cluster::election::LeaderRecord) {
    if let View::Other { host, .. } = leadership.get()
        && host == record.host
    {
        return;
    }
    let connect = Connect { endpoint: record.address.clone(), tls_dir: campaigner.tls_dir.clone(), token: None };
    match connect.connect().await {
        Ok(client) => {
            tracing::info!(leader = %record.host, "the cluster's leader");
            leadership.set(View::Other { host: record.host.clone(), client: Box::new(client) });
        }
        Err(e) => {
            tracing::warn!(leader = %record.host, "cannot reach the leader: {}", novacron_actors::error_chain(&e));
            leadership.set(View::Unknown);
        }
    }
}

/// Starts the ClusterSupervisor for a tenure just won.
async fn take_office(campaigner: &Campaigner, leadership: &Leadership, tenure: Tenure) -> Option<ActorRef<ClusterMsg>> {
    let args = (campaigner.cluster_args)(tenure);
    match ractor::Actor::spawn(None, ClusterSupervisor, args).await {
        Ok((actor, _)) => {
            leadership.set(View::Me(actor.clone(), tenure));
            Some(actor)
        }
        Err(e) => {
            tracing::error!("cannot start the cluster supervisor: {e}; stepping down");
            let _ = campaigner.candidate.step_down(&tenure).await;
            None
        }
    }
}

/// Renews the tenure until it ends; then the ClusterSupervisor stops.
async fn hold_office(campaigner: &Campaigner, leadership: &Leadership, actor: ActorRef<ClusterMsg>, tenure: Tenure) {
    loop {
        tokio::time::sleep(campaigner.timing.renew).await;
        match campaigner.candidate.hold(&tenure).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("the cluster's leadership lease ran out: no longer leading");
                break;
            }
            // The store is unreachable: the lease runs out by itself if it stays so, and the
            // tenure's guard keeps a deposed leader's writes out meanwhile.
            Err(e) => tracing::warn!("cannot renew the leadership: {}", novacron_actors::error_chain(&e)),
        }
    }
    actor.stop(Some("leadership ended".into()));
    leadership.set(View::Unknown);
}

/// Steps down now (the daemon stops): another daemon leads at once.
pub async fn step_down(candidate: &Candidate, leadership: &Leadership) {
    if let Some(tenure) = leadership.tenure() {
        if let Some(actor) = leadership.cluster() {
            actor.stop(Some("daemon stopping".into()));
        }
        leadership.set(View::Unknown);
        if let Err(e) = candidate.step_down(&tenure).await {
            tracing::warn!("cannot step down from leading the cluster: {e}");
        }
    }
}
