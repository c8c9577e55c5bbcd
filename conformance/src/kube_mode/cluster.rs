//! The API calls of the kube mode, synchronous on a runtime of their own (the runner and its
//! probe threads are plain threads): create, label patches, policy create/delete, pod
//! readiness and Service addresses.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::Value;

pub struct Cluster {
    client: Client,
    runtime: tokio::runtime::Runtime,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

impl Cluster {
    /// In-cluster service account, else KUBECONFIG / ~/.kube/config (as kubectl).
    pub fn infer() -> Result<Self> {
        let runtime = runtime()?;
        let client = runtime.block_on(async {
            let config = kube::Config::infer()
                .await
                .map_err(|e| anyhow!("kubernetes client config (KUBECONFIG or in-cluster): {e}"))?;
            Client::try_from(config).map_err(|e| anyhow!("kubernetes client: {e}"))
        })?;
        Ok(Self { client, runtime })
    }

    /// A plain URL without credentials (tests, `kubectl proxy`).
    pub fn url(url: &str) -> Result<Self> {
        let runtime = runtime()?;
        let uri: http::Uri = url.parse().context("API server URL")?;
        let client = runtime.block_on(async { Client::try_from(kube::Config::new(uri)) })?;
        Ok(Self { client, runtime })
    }

    pub fn namespace_exists(&self, name: &str) -> Result<bool> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        Ok(self.runtime.block_on(api.get_opt(name))?.is_some())
    }

    /// Creates a Namespace, Pod or Service given as JSON.
    pub fn create(&self, object: &Value) -> Result<()> {
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let pp = PostParams::default();
        let client = self.client.clone();
        let kind = object["kind"].as_str().unwrap_or_default();
        self.runtime
            .block_on(async {
                match kind {
                    "Namespace" => {
                        let o: Namespace = serde_json::from_value(object.clone())?;
                        Api::<Namespace>::all(client).create(&pp, &o).await?;
                    }
                    "Pod" => {
                        let o: Pod = serde_json::from_value(object.clone())?;
                        Api::<Pod>::namespaced(client, ns).create(&pp, &o).await?;
                    }
                    "Service" => {
                        let o: Service = serde_json::from_value(object.clone())?;
                        Api::<Service>::namespaced(client, ns)
                            .create(&pp, &o)
                            .await?;
                    }
                    other => bail!("cannot create a {other}"),
                }
                Ok(())
            })
            .with_context(|| format!("creating {kind} {ns}/{name}"))
    }

    pub fn patch_namespace(&self, name: &str, patch: &Value) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.runtime
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(patch)))
            .with_context(|| format!("labelling namespace {name}"))?;
        Ok(())
    }

    pub fn patch_pod(&self, ns: &str, name: &str, patch: &Value) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        self.runtime
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(patch)))
            .with_context(|| format!("labelling pod {ns}/{name}"))?;
        Ok(())
    }

    pub fn create_network_policy(&self, ns: &str, policy: &Value) -> Result<()> {
        let policy: NetworkPolicy = serde_json::from_value(policy.clone())?;
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), ns);
        self.runtime
            .block_on(api.create(&PostParams::default(), &policy))?;
        Ok(())
    }

    pub fn delete_network_policy(&self, ns: &str, name: &str) -> Result<()> {
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), ns);
        match self
            .runtime
            .block_on(api.delete(name, &DeleteParams::default()))
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting NetworkPolicy {ns}/{name}")),
        }
    }

    pub fn delete_namespace(&self, name: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match self
            .runtime
            .block_on(api.delete(name, &DeleteParams::background()))
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting namespace {name}")),
        }
    }

    /// Polls until the pod runs, is Ready and has an address; returns the address.
    pub fn wait_pod_ready(
        &self,
        ns: &str,
        name: &str,
        deadline: Instant,
        poll: Duration,
    ) -> Result<IpAddr> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        loop {
            let pod = self.runtime.block_on(api.get(name))?;
            let status = pod.status.unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if let (true, Some(ip)) = (
                status.phase.as_deref() == Some("Running") && ready,
                status.pod_ip,
            ) {
                return ip.parse().with_context(|| format!("podIP {ip}"));
            }
            if Instant::now() >= deadline {
                bail!(
                    "not Ready in time (phase {:?}); see kubectl -n {ns} describe pod {name}",
                    status.phase
                );
            }
            std::thread::sleep(poll);
        }
    }

    pub fn service_ip(&self, ns: &str, name: &str) -> Result<IpAddr> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let service = self.runtime.block_on(api.get(name))?;
        let ip = service
            .spec
            .and_then(|s| s.cluster_ip)
            .filter(|ip| !ip.is_empty() && ip != "None")
            .ok_or_else(|| anyhow!("Service {ns}/{name} has no ClusterIP"))?;
        ip.parse().with_context(|| format!("clusterIP {ip}"))
    }
}
