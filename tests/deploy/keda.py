"""The fields of KEDA's ScaledObject (keda.sh/v1alpha1) that a manifest may use, as a JSON schema
written from KEDA's documentation (ScaledObject specification; the redis and metrics-api
scalers), strict like the Kubernetes schemas: an unknown or misspelt field fails."""

from __future__ import annotations

STRING_NUMBER = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
TRIGGER_METADATA = {
    "redis": {
        "required": ["listName", "listLength"],
        "properties": {
            "address": {"type": "string", "pattern": r"^[^:/]+:[0-9]+$"},
            "addressFromEnv": {"type": "string"},
            "host": {"type": "string"},
            "port": {"type": "string"},
            "databaseIndex": STRING_NUMBER,
            "listName": {"type": "string"},
            "listLength": STRING_NUMBER,
            "activationListLength": STRING_NUMBER,
            "enableTLS": {"enum": ["true", "false"]},
            "usernameFromEnv": {"type": "string"},
            "passwordFromEnv": {"type": "string"},
        },
    },
    "metrics-api": {
        "required": ["url", "valueLocation", "targetValue"],
        "properties": {
            "url": {"type": "string", "pattern": r"^https?://"},
            "format": {"enum": ["json", "xml", "yaml", "prometheus"]},
            "valueLocation": {"type": "string"},
            "targetValue": STRING_NUMBER,
            "activationTargetValue": STRING_NUMBER,
            "authMode": {"type": "string"},
        },
    },
}


def _trigger(kind: str, metadata: dict) -> dict:
    return {
        "if": {"properties": {"type": {"const": kind}}},
        "then": {"properties": {"metadata": {**metadata, "type": "object", "additionalProperties": False}}},
    }


SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": list(TRIGGER_METADATA)},
                            "name": {"type": "string"},
                            "metadata": {"type": "object"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object"},
                        },
                        "allOf": [_trigger(kind, metadata) for kind, metadata in TRIGGER_METADATA.items()],
                    },
                },
            },
        },
    },
}
